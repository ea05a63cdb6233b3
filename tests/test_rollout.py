"""Rollouts: the Hugging Face engine, packing completions for the loss, their log-probs, and reward scoring.

Everything runs on CPU with the embedded ``ltpost:tiny-llama`` (random weights, a near-uniform next-token
distribution over 565 tokens, ``<|im_end|>`` = 3 is the end-of-turn/EOS token, pad 0). A random model almost never
samples EOS, so tests that need completions which end give the LM head a bias towards EOS (``eos_biased``): still the
real model and engine, only a likelier end. References are computed with plain forward passes over one unpadded
sequence at a time, so they share no code with the engine or the packing.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from ltpost.assets import make_rows
from ltpost.datamodules.prompts import collate_prompt_rows, tokenize_prompt
from ltpost.losses.logprobs import entropy_from_logits, selective_log_softmax
from ltpost.models import load_model
from ltpost.rewards import integer_accuracy, math_accuracy, reward_function_name
from ltpost.rollout import HFRolloutEngine, Rollout, RolloutEngine, SamplingParams
from ltpost.rollout.batch import completion_logps, pack_rollout, shared_prompt_mask
from ltpost.rollout.scoring import (
    ScoredRollout,
    default_engine,
    generate_and_score,
    resolve_reward_funcs,
    rollout_metrics,
)

EOS = 3
PAD = 0


# -- helpers -------------------------------------------------------------------------------------------------------


def chat_prompt(tokenizer, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]


@pytest.fixture
def prompts(tokenizer) -> list[list[int]]:
    """Three chat prompts of different lengths (so a batched call left-pads them)."""
    questions = ["What is 2 + 3?", "Add 40 and 41, then tell me the result of that addition.", "Hi"]
    ids = [chat_prompt(tokenizer, q) for q in questions]
    assert len({len(p) for p in ids}) == 3
    return ids


def eos_biased(model, bias: float = 4.5):
    """The model with ``bias`` added to the EOS logit (a biased LM head sharing the tied weight), so that sampled
    completions end after a few tokens (p(EOS) ~ 14% per step on the near-uniform random model)."""
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[EOS] = bias
    model.lm_head = biased
    return model


@torch.no_grad()
def reference_logits(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """``[len(completion), V]`` logits predicting each completion token, from one unpadded forward (no cache)."""
    was_training = model.training
    model.eval()
    logits = model(input_ids=torch.tensor([prompt + completion]), use_cache=False).logits[0]  # [T, V]
    model.train(was_training)
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)].float()


def generate(engine: HFRolloutEngine, prompt_ids, seed: int = 0, **params) -> Rollout:
    torch.manual_seed(seed)
    return engine.generate(prompt_ids, SamplingParams(**params))


# -- the engine: shape of the rollout ------------------------------------------------------------------------------


def test_rollout_is_grouped_by_prompt_and_cut_after_eos(tiny_model, prompts):
    """3 prompts x 4 generations: 12 completions, prompt_index [0,0,0,0,1,...,2]; a completion ends with EOS (and
    holds no other EOS) unless it is truncated, a truncated one has exactly max_completion_length tokens and no EOS;
    log-probs align with ids (same lengths, finite, <= 0). The seed gives both kinds of completion."""
    engine = HFRolloutEngine(eos_biased(tiny_model), eos_token_ids=[EOS], pad_token_id=PAD)
    assert isinstance(engine, RolloutEngine)
    rollout = generate(engine, prompts, max_completion_length=8, num_generations=4, temperature=1.0)
    assert rollout.prompt_index == [0] * 4 + [1] * 4 + [2] * 4
    assert len(rollout.completion_ids) == len(rollout.logprobs) == len(rollout.is_truncated) == 12
    for ids, logprobs, truncated in zip(rollout.completion_ids, rollout.logprobs, rollout.is_truncated):
        assert len(logprobs) == len(ids) >= 1
        assert all(isinstance(t, int) for t in ids) and all(isinstance(v, float) for v in logprobs)
        assert all(math.isfinite(v) and v <= 0.0 for v in logprobs)
        if truncated:
            assert len(ids) == 8 and EOS not in ids
        else:
            assert ids[-1] == EOS and EOS not in ids[:-1] and len(ids) <= 8
    assert any(rollout.is_truncated) and not all(rollout.is_truncated)
    assert PAD not in [t for ids in rollout.completion_ids for t in ids]  # generate's padding after EOS is cut


def test_default_engine_stops_at_the_tokenizer_eos(tiny_model, tokenizer):
    """default_engine takes the tokenizer's EOS and pad tokens (and the model's configured EOS)."""
    engine = default_engine(tiny_model, tokenizer, generation_batch_size=4)
    assert engine.eos_token_ids == [tokenizer.eos_token_id] == [EOS]
    assert engine.pad_token_id == tokenizer.pad_token_id == PAD
    assert engine.generation_batch_size == 4


# -- the engine: recorded log-probs --------------------------------------------------------------------------------


def test_sampling_logprobs_are_the_temperature_scaled_forward_logprobs(tiny_model, prompts):
    """Temperature 0.7, no top-k/top-p: every recorded log-prob equals log_softmax(logits / 0.7)[token] of an
    unpadded full forward over prompt + completion (to 1e-5), also for the left-padded shorter prompts and for the
    EOS that ends a completion. At temperature 1 the values would differ (the check is sharp)."""
    model = eos_biased(tiny_model)
    engine = HFRolloutEngine(model, eos_token_ids=[EOS], pad_token_id=PAD)
    rollout = generate(engine, prompts, max_completion_length=10, num_generations=3, temperature=0.7)
    assert not all(rollout.is_truncated)
    for index, ids, logprobs in zip(rollout.prompt_index, rollout.completion_ids, rollout.logprobs):
        logits = reference_logits(model, prompts[index], ids)
        expected = selective_log_softmax(logits / 0.7, torch.tensor(ids))
        torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-5, rtol=0)
        untempered = selective_log_softmax(logits, torch.tensor(ids))
        assert (untempered - expected).abs().max() > 1e-2


def test_top_k_logprobs_are_those_of_the_renormalized_top_k_distribution(tiny_model, prompts):
    """top_k=5 at temperature 0.8: each sampled token is among the 5 most likely under logits / 0.8, and its recorded
    log-prob is log_softmax over those 5 only (to 1e-5), hence >= its log-prob under the untruncated distribution."""
    model = eos_biased(tiny_model, bias=2.0)
    engine = HFRolloutEngine(model, eos_token_ids=[EOS], pad_token_id=PAD)
    rollout = generate(engine, prompts, max_completion_length=8, num_generations=3, temperature=0.8, top_k=5)
    for index, ids, logprobs in zip(rollout.prompt_index, rollout.completion_ids, rollout.logprobs):
        logits = reference_logits(model, prompts[index], ids) / 0.8  # [T, V]
        targets = torch.tensor(ids)
        top = logits.topk(5, dim=-1)
        assert (top.indices == targets[:, None]).any(-1).all()
        recorded = torch.tensor(logprobs)
        expected = logits.gather(-1, targets[:, None]).squeeze(-1) - top.values.logsumexp(-1)
        torch.testing.assert_close(recorded, expected, atol=1e-5, rtol=0)
        full = selective_log_softmax(logits, targets)
        assert (recorded >= full - 1e-6).all()
        assert (recorded - full).min() > 1.0  # 5 of 565 near-uniform tokens: log(565/5) ~ 4.7 higher


def test_greedy_is_the_argmax_identical_per_group_and_deterministic(tiny_model, prompts):
    """Temperature 0: every token is the argmax of the forward logits, all 3 generations of a prompt are identical,
    and a second call (another seed) gives the same rollout. The recorded log-probs are the untempered ones."""
    engine = HFRolloutEngine(tiny_model, eos_token_ids=[EOS], pad_token_id=PAD)
    first = generate(engine, prompts, seed=0, max_completion_length=6, num_generations=3, temperature=0.0)
    again = generate(engine, prompts, seed=123, max_completion_length=6, num_generations=3, temperature=0.0)
    assert first == again
    for p in range(len(prompts)):
        group = first.completion_ids[3 * p : 3 * p + 3]
        assert group[0] == group[1] == group[2]
        logits = reference_logits(tiny_model, prompts[p], group[0])
        assert logits.argmax(-1).tolist() == group[0]
        expected = selective_log_softmax(logits, torch.tensor(group[0]))
        torch.testing.assert_close(torch.tensor(first.logprobs[3 * p]), expected, atol=1e-5, rtol=0)
    assert len({tuple(first.completion_ids[3 * p]) for p in range(3)}) == 3  # different prompts, different answers


def test_sampling_is_reproducible_with_a_seed_and_varies_without(tiny_model, prompts):
    """The same torch seed gives the same sampled rollout; another seed a different one; the generations of one
    prompt differ from one another."""
    engine = HFRolloutEngine(tiny_model, eos_token_ids=[EOS], pad_token_id=PAD)
    params = {"max_completion_length": 6, "num_generations": 3, "temperature": 1.0}
    a = generate(engine, prompts, seed=7, **params)
    b = generate(engine, prompts, seed=7, **params)
    c = generate(engine, prompts, seed=8, **params)
    assert a == b
    assert a.completion_ids != c.completion_ids
    assert len({tuple(ids) for ids in a.completion_ids[:3]}) == 3


def test_generation_batch_size_chunks_give_the_same_greedy_rollout(tiny_model, prompts):
    """generation_batch_size=2 with 2 generations (one prompt per generate call, so each chunk is padded
    differently) and 5 (rows_per_call // group = 1 prompt per call) give the greedy rollout of one call."""
    params = {"max_completion_length": 6, "num_generations": 2, "temperature": 0.0}
    whole = generate(HFRolloutEngine(tiny_model, [EOS], PAD), prompts, **params)
    for size in (2, 5):
        chunked = generate(HFRolloutEngine(tiny_model, [EOS], PAD, generation_batch_size=size), prompts, **params)
        assert chunked.completion_ids == whole.completion_ids
        assert chunked.prompt_index == whole.prompt_index == [0, 0, 1, 1, 2, 2]
        for x, y in zip(chunked.logprobs, whole.logprobs):
            torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_prefill_once_gives_the_rollout_of_a_prefill_per_row(prompts, temperature):
    """prefill_once (each prompt's KV cache computed once and repeated for its 4 generations, left-padded prompts
    of three lengths) gives the same completions as prefilling every row, greedy (all truncated: the random model
    never picks EOS) and sampled with the same seed (EOS-biased: completions of several lengths), and the
    same recorded log-probs to 1e-5; and the prompt is prefilled once: the first forward of generate sees 3 rows
    of width-1 tokens instead of 12."""
    model = load_model("ltpost:tiny-llama")
    model = eos_biased(model) if temperature > 0 else model  # sampled completions of several lengths
    params = {"max_completion_length": 8, "num_generations": 4, "temperature": temperature}
    shapes = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    shared = generate(HFRolloutEngine(model, [EOS], PAD), prompts, seed=3, **params)
    first_shared = shapes[0]
    shapes.clear()
    per_row = generate(HFRolloutEngine(model, [EOS], PAD, prefill_once=False), prompts, seed=3, **params)
    hook.remove()
    width = max(len(p) for p in prompts)
    assert first_shared == (3, width - 1) and shapes[0] == (12, width)
    assert shared.completion_ids == per_row.completion_ids and shared.is_truncated == per_row.is_truncated
    assert any(len(c) > 1 for c in shared.completion_ids)
    for x, y in zip(shared.logprobs, per_row.logprobs):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["greedy", "sampled"])
def test_checkpoint_generation_config_does_not_leak_into_generation(tiny_model, prompts, temperature):
    """Settings shipped in a checkpoint's generation_config (Qwen2.5-Instruct ships repetition_penalty=1.05,
    temperature=0.7, top_p=0.8, top_k=20) must not change what the engine generates or records: the engine's comment
    promises that every sampling setting is one of ``SamplingParams``. With the same seed, the rollout equals the one
    under a clean generation_config (greedy and sampled), the recorded log-probs stay those of the forward logits
    (divided by the temperature when sampling), and the model's own generation_config is left as it was."""
    engine = HFRolloutEngine(tiny_model, eos_token_ids=[EOS], pad_token_id=PAD)
    params = {"max_completion_length": 8, "num_generations": 2, "temperature": temperature}
    clean = generate(engine, prompts, **params)
    config = tiny_model.generation_config
    config.repetition_penalty, config.temperature, config.top_p, config.top_k = 1.5, 0.3, 0.5, 5
    config.min_p, config.do_sample = 0.5, True
    leaky = generate(engine, prompts, **params)
    assert (config.repetition_penalty, config.top_k, config.min_p) == (1.5, 5, 0.5)  # the model's config is untouched
    for index, ids, logprobs in zip(leaky.prompt_index, leaky.completion_ids, leaky.logprobs):
        logits = reference_logits(tiny_model, prompts[index], ids) / (temperature or 1.0)
        expected = selective_log_softmax(logits, torch.tensor(ids))
        torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-5, rtol=0)
    assert leaky.completion_ids == clean.completion_ids


# -- the engine: mode, autograd, validation ------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_generate_runs_in_eval_mode_without_autograd_and_restores_the_mode(tiny_model, prompts, training):
    """Inside generate every forward runs in eval mode with gradients off (a forward hook on the first decoder layer
    records it); afterwards the model is back in the mode it was in, no parameter has a .grad, and the rollout holds
    plain Python numbers (no tensors that could keep a graph alive)."""
    tiny_model.train(training)
    seen = []
    hook = tiny_model.model.layers[0].register_forward_hook(
        lambda module, args, output: seen.append((module.training, torch.is_grad_enabled()))
    )
    try:
        engine = HFRolloutEngine(tiny_model, [EOS], PAD)
        rollout = generate(engine, prompts, max_completion_length=4, num_generations=2, temperature=1.0)
    finally:
        hook.remove()
    assert seen and set(seen) == {(False, False)}
    assert tiny_model.training is training
    assert all(m.training is training for m in tiny_model.modules())
    assert all(p.grad is None for p in tiny_model.parameters())
    assert all(type(v) is float for row in rollout.logprobs for v in row)
    assert all(type(t) is int for row in rollout.completion_ids for t in row)


def test_generate_restores_the_mode_when_generation_fails(tiny_model):
    """An error inside generate (a token id outside the vocabulary) still leaves the model in training mode."""
    tiny_model.train()
    engine = HFRolloutEngine(tiny_model, [EOS], PAD)
    with pytest.raises(IndexError):
        engine.generate([[10**6]], SamplingParams(max_completion_length=2))
    assert tiny_model.training


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_completion_length": 0}, "max_completion_length must be >= 1"),
        ({"num_generations": 0}, "num_generations must be >= 1"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    """Each out-of-range sampling setting raises a ValueError naming it and its valid range."""
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_accept_the_edges():
    """The valid edges construct: greedy, top_p 1, top_k 0, min_p 0 and 1."""
    SamplingParams(max_completion_length=1, num_generations=1, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0)
    SamplingParams(min_p=1.0, repetition_penalty=0.5)


def test_engine_input_validation(tiny_model):
    """No prompts, an empty prompt, generation_batch_size 0 and an empty EOS list are rejected with a message."""
    engine = HFRolloutEngine(tiny_model, [EOS], PAD)
    with pytest.raises(ValueError, match="non-empty list of non-empty prompts"):
        engine.generate([], SamplingParams())
    with pytest.raises(ValueError, match="non-empty list of non-empty prompts"):
        engine.generate([[5, 6], []], SamplingParams())
    with pytest.raises(ValueError, match="generation_batch_size must be >= 1"):
        HFRolloutEngine(tiny_model, [EOS], PAD, generation_batch_size=0)
    with pytest.raises(ValueError, match="at least one end-of-turn token"):
        HFRolloutEngine(tiny_model, [], PAD)


# -- pack_rollout --------------------------------------------------------------------------------------------------

P0, P1, P2 = [1, 2, 3], [1, 2, 3], [4, 5]
C0, C1, C2 = [10, 11], [12], []  # the last completion is empty


def test_pack_rollout_one_row_by_hand():
    """One row: [1 2 3 10 11 | 1 2 3 12 | 4 5], positions restarting at each sequence; the logits at positions 2, 3
    (sequence 0) and 7 (sequence 1) predict the completion tokens 10, 11, 12, which land at (0,0), (0,1), (1,0);
    the empty completion contributes nothing; mask [[1,1],[1,0],[0,0]], lengths [2,1,0], 11 tokens."""
    batch = pack_rollout([P0, P1, P2], [C0, C1, C2], pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 11, 1, 2, 3, 12, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1]]
    assert batch["logit_positions"].tolist() == [[2, 3, 7]]
    assert batch["targets"].tolist() == [[10, 11, 12]]
    assert batch["scatter_rows"].tolist() == [[0, 0, 1]]
    assert batch["scatter_cols"].tolist() == [[0, 1, 0]]
    assert batch["completion_mask"].tolist() == [[1, 1], [1, 0], [0, 0]]
    assert batch["completion_lengths"].tolist() == [2, 1, 0]
    assert batch["num_tokens"] == 11


def test_pack_rollout_rows_by_hand():
    """max_row_tokens=6: sequence 0 (5 tokens) fills row 0 (padded with pad id 99, the tail's positions starting at
    0); sequences 1 (4) and 2 (2) share row 1. Row 1 has one real logit position, its second slot is padding
    (position 0, target 0, scatter -1)."""
    batch = pack_rollout([P0, P1, P2], [C0, C1, C2], pad_token_id=99, max_row_tokens=6)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 11, 99], [1, 2, 3, 12, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 0, 1]]
    assert batch["logit_positions"].tolist() == [[2, 3], [2, 0]]
    assert batch["targets"].tolist() == [[10, 11], [12, 0]]
    assert batch["scatter_rows"].tolist() == [[0, 0], [1, -1]]
    assert batch["scatter_cols"].tolist() == [[0, 1], [0, -1]]
    assert batch["completion_mask"].tolist() == [[1, 1], [1, 0], [0, 0]]
    assert batch["completion_lengths"].tolist() == [2, 1, 0]
    assert batch["num_tokens"] == 11


def test_pack_rollout_long_sequence_gets_its_own_row():
    """max_row_tokens=4 is shorter than sequence 0 (5 tokens): it gets a row of its own (the widest, 5), and each
    of the others starts a new row as 4 + 2 > 4; padding tails restart their positions at 0."""
    batch = pack_rollout([P0, P1, P2], [C0, C1, C2], pad_token_id=PAD, max_row_tokens=4)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 11], [1, 2, 3, 12, 0], [4, 5, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 0, 1, 2]]
    assert batch["scatter_rows"].tolist() == [[0, 0], [1, -1], [-1, -1]]
    assert batch["logit_positions"].tolist() == [[2, 3], [2, 0], [0, 0]]


def test_pack_rollout_all_empty_completions_and_mismatch():
    """Only empty completions: a [N, 1] all-zero mask and one padding logit slot per row; a count mismatch raises."""
    batch = pack_rollout([P0, P2], [[], []])
    assert batch["completion_mask"].tolist() == [[0], [0]]
    assert batch["completion_lengths"].tolist() == [0, 0]
    assert batch["scatter_rows"].tolist() == [[-1]]
    assert batch["num_tokens"] == 5
    with pytest.raises(ValueError, match="Got 2 prompts for 1 completions"):
        pack_rollout([P0, P2], [C0])


def test_pack_rollout_shared_prompts_by_hand():
    """share_prompts: sequences 0 and 1 share prompt [1 2 3], laid out once: [1 2 3 | 10 11 | 12 | 4 5]. The
    completions' positions continue from the prompt (10, 11 at 3, 4; 12 at 3 again); both first tokens (10 and 12)
    are predicted from the prompt's last position 2, token 11 from position 3 (token 10). Group ids split the two
    prompts; segment ids mark the prompts 0 and each completion by its place in the row (1, 2; the empty third
    completion occupies no token). num_tokens still counts every sequence's prompt (TRL's count): 11."""
    batch = pack_rollout([P0, P1, P2], [C0, C1, C2], pad_token_id=PAD, share_prompts=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 11, 12, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 1]]
    assert batch["group_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 1, 1]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 0, 0]]
    assert batch["logit_positions"].tolist() == [[2, 3, 2]]
    assert batch["targets"].tolist() == [[10, 11, 12]]
    assert batch["scatter_rows"].tolist() == [[0, 0, 1]]
    assert batch["scatter_cols"].tolist() == [[0, 1, 0]]
    assert batch["completion_mask"].tolist() == [[1, 1], [1, 0], [0, 0]]
    assert batch["num_tokens"] == 11


def test_pack_rollout_shared_group_continues_in_the_next_row_with_its_prompt():
    """max_row_tokens=5: the group [1 2 3 | 10 11] fills row 0; completion [12] of the same prompt does not fit
    (5 + 1 > 5), so row 1 lays the prompt out again for it ([1 2 3 | 12], a padding tail of its own group), and
    [4 5] (2 tokens, 4 + 2 > 5) starts row 2."""
    batch = pack_rollout([P0, P1, P2], [C0, C1, C2], pad_token_id=PAD, max_row_tokens=5, share_prompts=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 11], [1, 2, 3, 12, 0], [4, 5, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 0, 1, 2]]
    assert batch["group_ids"].tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 1, 1, 1]]
    assert batch["logit_positions"].tolist() == [[2, 3], [2, 0], [0, 0]]
    assert batch["scatter_rows"].tolist() == [[0, 0], [1, -1], [-1, -1]]


def test_shared_prompt_mask_by_hand():
    """Row [p p c1 c1 c2 | q t]: the prompt tokens see the prompt causally; c1 sees the prompt and c1 causally, not
    c2; c2 sees the prompt and itself, not c1; the second group (q, tail t) sees only itself. Eager gets the
    additive form: 0 where allowed, the dtype's minimum elsewhere."""
    groups = torch.tensor([0, 0, 0, 0, 0, 1, 2])
    segments = torch.tensor([0, 0, 1, 1, 2, 0, 0])
    expected = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],
    ]
    mask = shared_prompt_mask(groups, segments)
    assert mask.shape == (1, 1, 7, 7) and mask.dtype == torch.bool
    assert mask[0, 0].long().tolist() == expected
    additive = shared_prompt_mask(groups, segments, torch.float32)[0, 0]
    assert (additive[mask[0, 0]] == 0).all() and (additive[~mask[0, 0]] == torch.finfo(torch.float32).min).all()


# -- completion_logps ----------------------------------------------------------------------------------------------


def random_sequences():
    """Four prompt/completion pairs of random ids; prompt + completion lengths 9, 10, 9, 8."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 500, (n,), generator=generator).tolist() for n in (5, 7, 3, 6)]
    completions = [torch.randint(4, 500, (n,), generator=generator).tolist() for n in (4, 3, 6, 2)]
    return prompts, completions


@pytest.mark.parametrize("max_row_tokens, num_rows", [(None, 1), (20, 2), (9, 4)])
def test_completion_logps_match_each_sequence_run_alone(tiny_model, max_row_tokens, num_rows):
    """Packed into one row, two rows of two sequences each, or one row per sequence (with a padding tail): the
    log-probs (temperature 0.7) and entropies of every completion token equal those of the sequence run alone
    through the model, unpadded (to 1e-5); positions outside the mask are exactly 0. A forward without position_ids
    restarts (sequences attending to their neighbours) would not match."""
    prompts, completions = random_sequences()
    batch = pack_rollout(prompts, completions, PAD, max_row_tokens)
    assert batch["input_ids"].size(0) == num_rows
    tiny_model.eval()
    logps, entropies = completion_logps(tiny_model, batch, temperature=0.7, with_entropy=True)
    assert logps.shape == entropies.shape == (4, 6)
    mask = batch["completion_mask"].bool()
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        logits = reference_logits(tiny_model, prompt, completion) / 0.7
        n = len(completion)
        torch.testing.assert_close(
            logps[i, :n], selective_log_softmax(logits, torch.tensor(completion)), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(entropies[i, :n], entropy_from_logits(logits), atol=1e-5, rtol=0)
    assert (logps[~mask] == 0).all() and (entropies[~mask] == 0).all()
    assert not entropies.requires_grad


def grouped_sequences():
    """Three prompts (lengths 5, 7, 3) with three completions each (lengths 0-5, one empty), grouped by prompt."""
    generator = torch.Generator().manual_seed(1)
    prompts, completions = [], []
    for n, lengths in zip((5, 7, 3), ((4, 0, 2), (3, 5, 1), (2, 2, 4))):
        prompt = torch.randint(4, 500, (n,), generator=generator).tolist()
        for length in lengths:
            prompts.append(prompt)
            completions.append(torch.randint(4, 500, (length,), generator=generator).tolist())
    return prompts, completions


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("max_row_tokens", [None, 12, 25])
def test_shared_prompt_logps_and_gradients_match_each_sequence_run_alone(attn_implementation, max_row_tokens):
    """share_prompts lays each prompt out once per group (one row, or groups split across rows of 12 / 25 tokens);
    the log-probs and entropies of every completion token still equal the sequence run alone (to 1e-5), and the
    gradient of the summed log-probs equals that of the unshared packing (the prompt's backward now runs once for
    its group, summing what the G copies contributed), for sdpa's boolean and eager's additive masks."""
    model = load_model("ltpost:tiny-llama", attn_implementation=attn_implementation)
    model.eval()
    prompts, completions = grouped_sequences()
    shared = pack_rollout(prompts, completions, PAD, max_row_tokens, share_prompts=True)
    unshared = pack_rollout(prompts, completions, PAD, max_row_tokens)
    assert shared["input_ids"].numel() < unshared["input_ids"].numel()
    logps, entropies = completion_logps(model, shared, temperature=0.7, with_entropy=True)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        n = len(completion)
        if n == 0:
            continue  # nothing to predict (its row in logps is all masked, checked below)
        logits = reference_logits(model, prompt, completion) / 0.7
        torch.testing.assert_close(
            logps[i, :n], selective_log_softmax(logits, torch.tensor(completion)), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(entropies[i, :n], entropy_from_logits(logits), atol=1e-5, rtol=0)
    assert (logps[~shared["completion_mask"].bool()] == 0).all()

    def gradients(batch):
        model.zero_grad()
        completion_logps(model, batch, temperature=0.7)[0].sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    with_sharing, without = gradients(shared), gradients(unshared)
    for name in without:
        torch.testing.assert_close(with_sharing[name], without[name], atol=1e-5, rtol=1e-4, msg=name)


def test_completion_logps_differ_without_sequence_separation(tiny_model):
    """Control for the test above: the second sequence of a packed row, run with its left neighbour in context
    (positions continuing), gives other log-probs; so matching the single-sequence run really checks separation."""
    prompts, completions = random_sequences()
    tiny_model.eval()
    with torch.no_grad():
        joined = prompts[0] + completions[0] + prompts[1] + completions[1]
        logits = tiny_model(input_ids=torch.tensor([joined])).logits[0]
        start = len(prompts[0] + completions[0]) + len(prompts[1]) - 1
        contaminated = selective_log_softmax(logits[start : start + 3] / 0.7, torch.tensor(completions[1]))
    alone = selective_log_softmax(
        reference_logits(tiny_model, prompts[1], completions[1]) / 0.7, torch.tensor(completions[1])
    )
    assert (contaminated - alone).abs().max() > 1e-3


def test_completion_logps_are_differentiable(tiny_model):
    """logps.sum().backward() reaches the embeddings (tied LM head), the attention and the MLP weights; a masked
    position carries no gradient (the logps there are constant zeros)."""
    prompts, completions = random_sequences()
    batch = pack_rollout(prompts, completions, PAD, max_row_tokens=20)
    tiny_model.train()
    logps, entropies = completion_logps(tiny_model, batch, temperature=1.0)
    assert entropies is None
    assert logps.requires_grad
    logps.sum().backward()
    layer = tiny_model.model.layers[0]
    for parameter in (tiny_model.model.embed_tokens.weight, layer.self_attn.q_proj.weight, layer.mlp.up_proj.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_completion_logps_of_engine_rollout_match_recorded_logprobs(tiny_model, prompts):
    """End to end: the engine's recorded sampling log-probs (temperature 0.7) equal completion_logps of the packed
    rollout at the same temperature (the ratio PPO-style losses start from is 1 when nothing changed)."""
    model = eos_biased(tiny_model)
    engine = HFRolloutEngine(model, [EOS], PAD)
    rollout = generate(engine, prompts, max_completion_length=8, num_generations=2, temperature=0.7)
    prompt_ids = [prompts[i] for i in rollout.prompt_index]
    batch = pack_rollout(prompt_ids, rollout.completion_ids, PAD, max_row_tokens=32)
    model.eval()
    with torch.no_grad():
        logps, _ = completion_logps(model, batch, temperature=0.7)
    for i, recorded in enumerate(rollout.logprobs):
        torch.testing.assert_close(logps[i, : len(recorded)], torch.tensor(recorded), atol=1e-5, rtol=0)


# -- generate_and_score / rollout_metrics --------------------------------------------------------------------------


def prompt_batch(tokenizer, rows: list[dict]) -> dict:
    tokenized = [{**row, **tokenize_prompt(row, tokenizer=tokenizer, prompt_column="prompt")} for row in rows]
    return collate_prompt_rows([{**row, "example_index": i} for i, row in enumerate(tokenized)])


def test_generate_and_score_passes_trl_keywords_and_combines_rewards(tiny_model, tokenizer):
    """Three conversational arithmetic prompts x 4 generations. integer_accuracy scores prompts 0 and 1 (prompt 2's
    answer is not an integer: None); a second function scores prompt 0 only. The functions receive prompts repeated
    per completion, completions as [{"role": "assistant", "content": text}], the answer column repeated, and
    completion_ids; rewards are the weighted sums (2 * accuracy + 0.5 * length score), NaN for prompt 2."""
    rows = make_rows("arithmetic-prompts", "train", num_rows=3)
    rows[2]["answer"] = "not a number"
    batch = prompt_batch(tokenizer, rows)
    calls = []

    def length_score(prompts, completions, completion_ids, answer, **kwargs):
        calls.append(
            dict(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer, **kwargs)
        )
        return [len(ids) / 10 if a == rows[0]["answer"] else None for ids, a in zip(completion_ids, answer)]

    engine = HFRolloutEngine(eos_biased(tiny_model), [EOS], PAD)
    torch.manual_seed(0)
    params = SamplingParams(max_completion_length=6, num_generations=4, temperature=1.0)
    scored = generate_and_score(engine, tokenizer, [integer_accuracy, length_score], [2.0, 0.5], batch, params)
    rollout = scored.rollout
    assert rollout.prompt_index == [0] * 4 + [1] * 4 + [2] * 4
    assert scored.prompt_ids == [batch["prompt_ids"][i] for i in rollout.prompt_index]
    assert scored.texts == [tokenizer.decode(ids, skip_special_tokens=True) for ids in rollout.completion_ids]
    (call,) = calls
    assert set(call) == {"prompts", "completions", "completion_ids", "answer"}
    assert call["prompts"] == [rows[i]["prompt"] for i in rollout.prompt_index]
    assert call["completions"] == [[{"role": "assistant", "content": t}] for t in scored.texts]
    assert call["answer"] == [rows[i]["answer"] for i in rollout.prompt_index]
    assert call["completion_ids"] == rollout.completion_ids
    accuracy = integer_accuracy(None, scored.texts, [rows[i]["answer"] for i in rollout.prompt_index])
    lengths = [len(ids) / 10 if i == 0 else None for ids, i in zip(rollout.completion_ids, rollout.prompt_index)]
    assert scored.per_function == [accuracy, lengths]
    assert scored.rewards.shape == (12,) and scored.rewards.dtype == torch.float32
    for n in range(12):
        if n < 4:
            assert scored.rewards[n].item() == pytest.approx(2.0 * accuracy[n] + 0.5 * lengths[n])
        elif n < 8:
            assert scored.rewards[n].item() == pytest.approx(2.0 * accuracy[n])
        else:
            assert math.isnan(scored.rewards[n].item())


def test_generate_and_score_plain_text_prompts_get_string_completions(tiny_model, tokenizer):
    """Plain-text prompts (ltpost:arithmetic-completion): prompts and completions reach the functions as strings,
    and the other dataset column (completion) is repeated per completion."""
    rows = make_rows("arithmetic-completion", "train", num_rows=2)
    batch = prompt_batch(tokenizer, rows)
    assert batch["prompt_ids"][0] == tokenizer(rows[0]["prompt"]).input_ids
    seen = {}

    def constant(prompts, completions, **columns):
        seen.update(prompts=prompts, completions=completions, **columns)
        return [1.0] * len(completions)

    engine = HFRolloutEngine(tiny_model, [EOS], PAD)
    params = SamplingParams(max_completion_length=3, num_generations=2, temperature=0.0)
    scored = generate_and_score(engine, tokenizer, [constant], None, batch, params)
    assert seen["prompts"] == [rows[0]["prompt"]] * 2 + [rows[1]["prompt"]] * 2
    assert seen["completions"] == scored.texts and all(isinstance(t, str) for t in scored.texts)
    assert seen["completion"] == [rows[0]["completion"]] * 2 + [rows[1]["completion"]] * 2
    assert scored.rewards.tolist() == [1.0] * 4


def test_generate_and_score_errors(tiny_model, tokenizer):
    """Every function returning None for everything: ValueError saying None and naming the functions; a function
    that raises: ValueError naming it and the original error; a wrong number of rewards: ValueError with counts."""
    batch = prompt_batch(tokenizer, make_rows("arithmetic-prompts", "train", num_rows=2))
    engine = HFRolloutEngine(tiny_model, [EOS], PAD)
    params = SamplingParams(max_completion_length=2, num_generations=2, temperature=1.0)

    def never_applies(completions, **kwargs):
        return [None] * len(completions)

    def broken(completions, **kwargs):
        raise KeyError("solution")

    def too_few(completions, **kwargs):
        return [1.0]

    with pytest.raises(ValueError, match=r"Every reward function \(never_applies\) returned None for all 4"):
        generate_and_score(engine, tokenizer, [never_applies], None, batch, params)
    with pytest.raises(ValueError, match="reward function 'broken' raised KeyError") as error:
        generate_and_score(engine, tokenizer, [integer_accuracy, broken], None, batch, params)
    assert isinstance(error.value.__cause__, KeyError)
    with pytest.raises(ValueError, match="reward function 'too_few' returned 1 values for 4 completions"):
        generate_and_score(engine, tokenizer, [too_few], None, batch, params)


def test_rollout_metrics_match_the_rollout(tiny_model, tokenizer):
    """Per-function mean and (sample) std over the completions each function scored, a function that scored none
    has no entry; length metrics from the completion ids: mean/min/max, clipped ratio = truncated fraction, mean
    length of the completions that ended. The seed gives both ended and truncated completions."""
    rows = make_rows("arithmetic-prompts", "train", num_rows=3)
    batch = prompt_batch(tokenizer, rows)

    def length_score(completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    def first_prompt_only(completion_ids, answer, **kwargs):
        return [1.0 if a == rows[0]["answer"] else None for a in answer]

    def never(completions, **kwargs):
        return [None] * len(completions)

    engine = HFRolloutEngine(eos_biased(tiny_model), [EOS], PAD)
    torch.manual_seed(1)
    params = SamplingParams(max_completion_length=6, num_generations=4, temperature=1.0)
    functions = [length_score, first_prompt_only, never]
    scored = generate_and_score(engine, tokenizer, functions, None, batch, params)
    names = [reward_function_name(f) for f in functions]
    metrics = rollout_metrics(scored, names)
    lengths = [len(ids) for ids in scored.rollout.completion_ids]
    truncated = scored.rollout.is_truncated
    assert 0 < sum(truncated) < len(truncated)
    assert set(metrics) == {
        "rewards/length_score/mean", "rewards/length_score/std",
        "rewards/first_prompt_only/mean", "rewards/first_prompt_only/std",
        "completions/mean_length", "completions/min_length", "completions/max_length",
        "completions/clipped_ratio", "completions/mean_terminated_length",
    }  # fmt: skip
    assert metrics["rewards/length_score/mean"] == pytest.approx(statistics.mean(lengths))
    assert metrics["rewards/length_score/std"] == pytest.approx(statistics.stdev(lengths))
    assert metrics["rewards/first_prompt_only/mean"] == 1.0
    assert metrics["rewards/first_prompt_only/std"] == 0.0
    assert metrics["completions/mean_length"] == pytest.approx(statistics.mean(lengths))
    assert metrics["completions/min_length"] == min(lengths)
    assert metrics["completions/max_length"] == max(lengths) == 6
    assert metrics["completions/clipped_ratio"] == pytest.approx(sum(truncated) / len(truncated))
    ended = [n for n, cut in zip(lengths, truncated) if not cut]
    assert metrics["completions/mean_terminated_length"] == pytest.approx(statistics.mean(ended))
    assert all(isinstance(v, float) for v in metrics.values())


def test_rollout_metrics_with_one_completion_and_none_terminated():
    """One scored completion: std 0.0 (not NaN); no completion ended: mean_terminated_length 0.0, clipped 1.0."""
    rollout = Rollout([[5, 6, 7]], [[-1.0, -1.0, -1.0]], [True], [0])
    scored_rewards = torch.tensor([0.5])
    metrics = rollout_metrics(ScoredRollout(rollout, [[1]], ["x"], scored_rewards, [[0.5]]), ["f"])
    assert metrics["rewards/f/mean"] == 0.5 and metrics["rewards/f/std"] == 0.0
    assert metrics["completions/clipped_ratio"] == 1.0
    assert metrics["completions/mean_terminated_length"] == 0.0
    assert metrics["completions/mean_length"] == metrics["completions/max_length"] == 3.0


# -- resolve_reward_funcs ------------------------------------------------------------------------------------------


def test_resolve_reward_funcs():
    """An import path resolves to the object it names; a callable is kept as is; anything else raises a ValueError
    that says what a reward function must be."""

    def mine(completions, **kwargs):
        return [0.0] * len(completions)

    resolved = resolve_reward_funcs(["ltpost.rewards.integer_accuracy", mine, "ltpost.rewards.accuracy.math_accuracy"])
    assert resolved == [integer_accuracy, mine, math_accuracy]
    assert resolved[0] is integer_accuracy and resolved[1] is mine
    for bad in (3, None, ["ltpost.rewards.integer_accuracy"]):
        with pytest.raises(ValueError, match="A reward function must be a callable"):
            resolve_reward_funcs([bad])
