"""Reward functions: hand-checked values for every verifier and penalty, the learned-reward wrapper against
``sequence_scores``, and the calling/combining machinery the online trainers use."""

from __future__ import annotations

import asyncio
import functools
import math
import pickle
import threading

import pytest
import torch

from ltpost import RewardModule
from ltpost.assets import make_rows
from ltpost.modules.reward import sequence_scores
from ltpost.rewards import (
    RewardModelScorer,
    call_reward_functions,
    combine_rewards,
    completion_text,
    digit_accuracy,
    integer_accuracy,
    math_accuracy,
    repetition_penalty,
    reward_function_name,
    soft_overlong_penalty,
    think_format,
)


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# -- completion_text / names -------------------------------------------------------------------------------------


def test_completion_text_reads_strings_messages_and_text_parts():
    assert completion_text("42") == "42"
    assert completion_text(chat("42")) == "42"
    assert completion_text({"role": "assistant", "content": "7"}) == "7"
    assert completion_text(chat("a") + chat("b")) == "a\nb"
    assert (
        completion_text([{"role": "assistant", "content": [{"type": "text", "text": "x"}, {"type": "image"}]}]) == "x"
    )
    with pytest.raises(TypeError, match="string or a list of chat messages"):
        completion_text(42)


def test_reward_function_name():
    async def judge(prompts, completions, **kwargs):
        return []

    assert reward_function_name(integer_accuracy) == "integer_accuracy"
    assert reward_function_name(judge) == "judge"
    assert reward_function_name(functools.partial(integer_accuracy, answer=["1"])) == "integer_accuracy"
    assert reward_function_name(soft_overlong_penalty(10, 2)) == "soft_overlong_penalty"
    assert reward_function_name(repetition_penalty()) == "repetition_penalty"

    class Judge:
        def __call__(self, prompts, completions, **kwargs):
            return []

    assert reward_function_name(Judge()) == "Judge"


# -- integer_accuracy --------------------------------------------------------------------------------------------


def test_integer_accuracy_reads_the_last_number():
    completions = [
        "The answer is 81",
        "The answer is 81.",
        "81 or 82",  # last integer is 82
        chat("81"),  # conversational
        "no number here",
        "5-3 gives 2",  # "-3" is not read as a negative number: last is 2
        "The total is 1,234",
        "81.0",
        "2.5",
        "-4",
    ]
    answers = ["81", "81", "81", "81", "81", "2", "1234", "81", "2", "-4"]
    assert integer_accuracy(None, completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]


def test_integer_accuracy_none_for_non_integer_gold_and_ignores_other_columns():
    assert integer_accuracy(["p", "q"], ["3", "3"], answer=["three", 3], trainer_state=None, other=[1, 2]) == [
        None,
        1.0,
    ]


def test_integer_accuracy_reads_gsm8k_answers_after_the_marker():
    """GSM8K's answer column is a worked solution ending in '#### <answer>': only the part after the marker counts,
    so the intermediate 48 / 2 = 24 in the solution does not make '24' correct."""
    gold = ["Natalia sold 48/2 = <<48/2=24>>24 clips in May. 48+24 = <<48+24=72>>72\n#### 72"] * 3
    rewards = integer_accuracy([], ["So the total is 72.", "24", "The answer: 7,2"], answer=gold)
    assert rewards == [1.0, 0.0, 0.0]


def test_digit_accuracy_gives_partial_credit_by_place():
    """Gold 81, aligned at the units digit over the longer number: '81' 2/2 = 1.0; '71' only the units place = 0.5;
    '181' 2 of 3 places = 2/3; '8' puts 8 in the units place against 1 and misses the tens = 0.0; '-81' has the
    wrong sign = 0.0; '81.5' is not an integer = 0.0; a non-integer gold gives None; GSM8K's '#### 81' is read."""
    completions = ["81", "71", "181", "8", "-81", "81.5", "no number"]
    assert digit_accuracy(None, completions, answer=["81"] * 7) == [1.0, 0.5, 2 / 3, 0.0, 0.0, 0.0, 0.0]
    assert digit_accuracy(None, ["81", "81"], answer=["eighty-one", "so #### 81"]) == [None, 1.0]


def test_integer_accuracy_on_the_arithmetic_prompts_task():
    rows = make_rows("arithmetic-prompts", "train", num_rows=4)
    prompts = [r["prompt"] for r in rows]
    answers = [r["answer"] for r in rows]
    right = [chat(f"It is {a}") for a in answers]
    wrong = [chat(str(int(a) + 1)) for a in answers]
    assert integer_accuracy(prompts, right, answer=answers) == [1.0] * 4
    assert integer_accuracy(prompts, wrong, answer=answers) == [0.0] * 4


# -- math_accuracy -----------------------------------------------------------------------------------------------


def test_math_accuracy_with_math_verify():
    completions = [
        "\\boxed{\\frac{1}{2}}",  # equals 0.5
        "So the result is $\\frac{1}{3}$",  # wrong value
        "0.5",  # right value but not LaTeX-anchored: TRL's extraction ignores unanchored text
        chat("Final: \\boxed{1/2}"),
        "\\boxed{4}",
    ]
    solutions = ["$0.5$", "$0.5$", "$0.5$", "$\\frac12$", "not math at all"]
    assert math_accuracy(None, completions, solution=solutions) == [1.0, 0.0, 0.0, 1.0, None]


def test_math_accuracy_reads_answer_when_there_is_no_solution_column_and_works_off_the_main_thread():
    assert math_accuracy(None, ["\\boxed{81}", "\\boxed{80}"], answer=["81", "81"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="'solution' or an 'answer'"):
        math_accuracy(None, ["\\boxed{1}"])
    results = []  # math-verify's signal-based timeouts would raise in a thread; math_accuracy turns them off there
    thread = threading.Thread(
        target=lambda: results.append(math_accuracy(None, ["\\boxed{\\frac{1}{2}}"], solution=["$0.5$"]))
    )
    thread.start()
    thread.join()
    assert results == [[1.0]]


# -- think_format ------------------------------------------------------------------------------------------------


def test_think_format():
    completions = [
        "<think>\nreasoning\n</think>\nThe answer is 4.",
        chat("<think>r</think>4"),
        "<think>r</think>",  # an empty answer still matches, as in TRL
        "<think>\nreasoning\nThe answer is 4.",  # never closed
        " <think>r</think>4",  # must start with the tag
        "The answer is 4. <think>r</think>",
        "<think>a<think>b</think>c",  # a second opening tag
        "4",
    ]
    assert think_format(None, completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


# -- penalties ---------------------------------------------------------------------------------------------------


def test_soft_overlong_penalty_is_zero_then_linear_to_minus_one():
    penalty = soft_overlong_penalty(max_completion_length=100, soft_punish_cache=20)
    lengths = [10, 80, 90, 100, 101, 95]  # 80 = L - cache, 90 = halfway into the zone, 100 = L
    rewards = penalty(["p"] * 6, ["c"] * 6, completion_ids=[[7] * n for n in lengths], answer=["x"] * 6)
    assert rewards == [0.0, 0.0, -0.5, -1.0, -1.0, -0.75]
    hard = soft_overlong_penalty(10, 0)  # no zone: a hard -1 past L
    assert hard(None, ["c"] * 2, completion_ids=[[1] * 10, [1] * 11]) == [0.0, -1.0]
    assert pickle.loads(pickle.dumps(penalty))(None, ["c"], completion_ids=[[1] * 90]) == [-0.5]


def test_soft_overlong_penalty_errors():
    with pytest.raises(ValueError, match="completion_ids"):
        soft_overlong_penalty(100, 20)(None, ["c"])
    with pytest.raises(ValueError, match="soft_punish_cache"):
        soft_overlong_penalty(10, 11)
    with pytest.raises(ValueError, match="max_completion_length"):
        soft_overlong_penalty(0, 0)


def test_repetition_penalty_on_words():
    penalty = repetition_penalty(ngram_size=3, max_penalty=-1.0)
    completions = [
        "the quick brown fox jumps",  # 3 trigrams, all distinct
        "x x x x x",  # 3 trigrams, 1 distinct: (1 - 1/3) * -1
        "a b c a b c a b c",  # 7 trigrams, 3 distinct: (1 - 3/7) * -1
        chat("A B C a b c"),  # lowercased: 4 trigrams, 3 distinct
        "too short",
    ]
    rewards = penalty(None, completions)
    assert rewards[0] == 0.0 and rewards[4] == 0.0
    assert rewards[1] == pytest.approx(-2 / 3)
    assert rewards[2] == pytest.approx(-4 / 7)
    assert rewards[3] == pytest.approx(-1 / 4)
    assert repetition_penalty(3, max_penalty=-0.5)(None, ["x x x x x"]) == [pytest.approx(-1 / 3)]


def test_repetition_penalty_on_tokens():
    penalty = repetition_penalty(ngram_size=2, unit="tokens")
    # [5]*5: 4 bigrams, 1 distinct -> (1 - 1/4) * -1 (TRL's documented example)
    assert penalty(None, ["a", "b"], completion_ids=[[1, 2, 3, 4], [5, 5, 5, 5, 5]]) == [0.0, -0.75]
    with pytest.raises(ValueError, match="completion_ids"):
        penalty(None, ["a"])
    with pytest.raises(ValueError, match="<= 0"):
        repetition_penalty(max_penalty=0.5)


# -- RewardModelScorer -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported_reward_model(tmp_path_factory):
    """An untrained RewardModule exported as HFExport does (save_pretrained of model and tokenizer)."""
    module = RewardModule()
    module.configure_model()
    path = tmp_path_factory.mktemp("reward-model")
    module.model.save_pretrained(path)
    module.tokenizer.save_pretrained(path)
    return path, module.model.eval(), module.tokenizer


def _reference_score(model, ids: list[int]) -> float:
    """``sequence_scores`` on one unpadded sequence: the value the scorer must reproduce in a padded batch."""
    batch = {
        "input_ids": torch.tensor([ids]),  # [1, L]
        "position_ids": torch.arange(len(ids))[None],  # [1, L]
        "sequence_ends": torch.tensor([len(ids) - 1]),  # [1]
    }
    with torch.no_grad():
        return float(sequence_scores(model, batch)[0])


def test_reward_model_scorer_matches_sequence_scores_on_conversations(exported_reward_model):
    path, model, tokenizer = exported_reward_model
    scorer = RewardModelScorer(str(path), batch_size=2)
    assert scorer.__name__ == path.name
    rows = make_rows("arithmetic-prompts", "train", num_rows=3)
    prompts = [r["prompt"] for r in rows]
    completions = [chat(r["answer"]) for r in rows[:2]] + ["a much longer answer: " + rows[2]["answer"]]  # str too
    scores = scorer(prompts, completions, answer=[r["answer"] for r in rows])
    assert len(scores) == 3 and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    for prompt, completion, score in zip(prompts, completions, scores):
        message = completion if isinstance(completion, list) else chat(completion)
        ids = tokenizer.apply_chat_template(prompt + message, tokenize=True, return_dict=True)["input_ids"]
        assert scorer.token_ids(prompt, completion) == list(ids)
        assert score == pytest.approx(_reference_score(model, list(ids)), abs=1e-5)
    assert len({round(s, 6) for s in scores}) == 3  # distinct inputs, distinct scores: the head is not degenerate


def test_reward_model_scorer_plain_text_and_as_a_reward_function(exported_reward_model):
    path, model, tokenizer = exported_reward_model
    scorer = RewardModelScorer(str(path), batch_size=8, name="rm")
    prompts, completions = ["12 + 30 =", "1 + 1 ="], [" 42", " 3"]
    (scores,) = call_reward_functions([scorer], prompts, completions, {"answer": ["42", "2"]})
    for prompt, completion, score in zip(prompts, completions, scores):
        ids = (
            tokenizer(prompt).input_ids
            + tokenizer(completion, add_special_tokens=False).input_ids
            + [tokenizer.eos_token_id]
        )
        assert score == pytest.approx(_reference_score(model, ids), abs=1e-5)
    assert reward_function_name(scorer) == "rm"
    truncated = RewardModelScorer(str(path), max_length=3)
    assert len(truncated.token_ids(prompts[0], completions[0])) == 3


# -- combine_rewards ---------------------------------------------------------------------------------------------


def test_combine_rewards_weights_skip_none_and_flag_unscored_rows():
    per_function = [[1.0, None, None, 0.0], [0.5, 0.5, None, -1.0]]
    total, valid = combine_rewards(per_function, weights=[2.0, 1.0])
    assert total == [2.5, 0.5, 0.0, -1.0]
    assert valid == [True, True, False, True]
    total, valid = combine_rewards(per_function)  # weights default to 1
    assert total == [1.5, 0.5, 0.0, -1.0] and valid == [True, True, False, True]


def test_combine_rewards_errors():
    with pytest.raises(ValueError, match="2 reward weights for 1 reward functions"):
        combine_rewards([[1.0]], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="every completion"):
        combine_rewards([[1.0, 2.0], [1.0]])
    with pytest.raises(ValueError, match="at least one"):
        combine_rewards([])


# -- call_reward_functions ---------------------------------------------------------------------------------------


def test_call_reward_functions_sync_async_and_columns():
    seen = {}

    def length(prompts, completions, **kwargs):
        seen.update(kwargs)
        return [float(len(completion_text(c))) for c in completions]

    async def judge(prompts, completions, answer, **kwargs):
        await asyncio.sleep(0)
        return [1.0 if completion_text(c) == a else None for c, a in zip(completions, answer)]

    async def half(prompts, completions, **kwargs):
        return [0.5] * len(completions)

    prompts, completions = ["q1", "q2"], ["7", chat("eight")]
    columns = {"answer": ["7", "8"], "completion_ids": [[1], [2, 3]]}
    results = call_reward_functions([length, judge, integer_accuracy, half], prompts, completions, columns)
    assert results == [[1.0, 5.0], [1.0, None], [1.0, 0.0], [0.5, 0.5]]
    assert seen == columns  # every column reaches the function as a keyword
    assert combine_rewards(results, [1.0, 1.0, 1.0, 2.0]) == ([4.0, 6.0], [True, True])


def test_call_reward_functions_inside_a_running_event_loop():
    async def half(prompts, completions, **kwargs):
        return [0.5] * len(completions)

    async def main():
        return call_reward_functions([half], ["p"], ["c"], {})

    assert asyncio.run(main()) == [[0.5]]


def test_call_reward_functions_normalizes_values():
    def mixed(prompts, completions, **kwargs):
        return (1, True, float("nan"), None)

    def tensor(prompts, completions, **kwargs):
        return torch.tensor([0.25, 0.5, 1.0, 2.0])

    assert call_reward_functions([mixed, tensor], ["p"] * 4, ["c"] * 4) == [
        [1.0, 1.0, None, None],
        [0.25, 0.5, 1.0, 2.0],
    ]


def test_call_reward_functions_names_the_failing_function():
    def broken(prompts, completions, **kwargs):
        raise KeyError("solution")

    async def broken_async(prompts, completions, **kwargs):
        raise RuntimeError("judge unreachable")

    def short(prompts, completions, **kwargs):
        return [1.0] * 3

    def scalar(prompts, completions, **kwargs):
        return 1.0

    def strings(prompts, completions, **kwargs):
        return ["1.0"] * len(completions)

    def infinite(prompts, completions, **kwargs):
        return [math.inf] * len(completions)

    prompts, completions = ["p"] * 4, ["c"] * 4
    with pytest.raises(ValueError, match="reward function 'broken' raised KeyError") as info:
        call_reward_functions([integer_accuracy, broken], prompts, completions, {"answer": ["1"] * 4})
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(
        ValueError, match="reward function 'broken_async' raised RuntimeError: judge unreachable"
    ) as info:
        call_reward_functions([broken_async], prompts, completions)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ValueError, match="reward function 'short' returned 3 values for 4 completions"):
        call_reward_functions([short], prompts, completions)
    with pytest.raises(ValueError, match="reward function 'scalar' returned float"):
        call_reward_functions([scalar], prompts, completions)
    with pytest.raises(ValueError, match="reward function 'strings' returned a str"):
        call_reward_functions([strings], prompts, completions)
    with pytest.raises(ValueError, match="reward function 'infinite' returned inf"):
        call_reward_functions([infinite], prompts, completions)
    with pytest.raises(ValueError, match="Column 'answer' has 2 values for 4 completions"):
        call_reward_functions([short], prompts, completions, {"answer": ["1", "2"]})
