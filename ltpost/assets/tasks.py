"""Deterministic synthetic tasks for the embedded default: arithmetic, generated from a seed.

Every task is addition of two integers in ``[0, max_operand]``. The train and test splits never share an
``(a, b)`` pair: a pair belongs to the test split when a seeded hash of it falls in the held-out bucket, so
held-out accuracy measures generalization rather than recall. Nothing is stored on disk; the same seed gives
the same rows on every machine and Python version (``random.Random`` with an integer seed is stable).

Shapes (TRL's dataset formats):

- ``arithmetic``             conversational ``messages`` (SFT) plus an ``answer`` column
- ``arithmetic-completion``  plain ``prompt`` / ``completion`` strings
- ``arithmetic-text``        plain ``text`` (language modeling)
- ``arithmetic-preference``  conversational ``prompt`` / ``chosen`` / ``rejected`` plus ``answer``
- ``arithmetic-prompts``     conversational ``prompt`` plus ``answer`` (online RL)
"""

from __future__ import annotations

import hashlib
import random

import datasets

TASKS = ("arithmetic", "arithmetic-completion", "arithmetic-text", "arithmetic-preference", "arithmetic-prompts")
SPLITS = ("train", "test")
DEFAULT_ROWS = {"train": 4000, "test": 200}

QUESTION_TEMPLATES = (
    "What is {a} + {b}?",
    "Compute {a} + {b}.",
    "{a} + {b} = ?",
    "Add {a} and {b}.",
    "What do you get when you add {a} and {b}?",
)


def _is_held_out(a: int, b: int, seed: int, held_out_percent: int = 10) -> bool:
    digest = hashlib.sha256(f"{seed}:{a}:{b}".encode()).digest()
    return digest[0] * 100 // 256 < held_out_percent


def _pairs(split: str, num_rows: int, seed: int, max_operand: int) -> list[tuple[int, int, int]]:
    """``num_rows`` ``(a, b, template_index)`` triples for ``split``; pairs repeat only when the split is exhausted."""
    pool = [
        (a, b)
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
        if _is_held_out(a, b, seed) == (split == "test")
    ]
    rng = random.Random(f"{seed}:{split}")
    rows: list[tuple[int, int, int]] = []
    while len(rows) < num_rows:
        rng.shuffle(pool)
        rows.extend((a, b, rng.randrange(len(QUESTION_TEMPLATES))) for a, b in pool[: num_rows - len(rows)])
    return rows


def _wrong_answer(answer: int, rng: random.Random, max_sum: int) -> int:
    """A plausible but clearly wrong sum: in range, and at least 5 away from the answer.

    Near misses (off by 1 or 2) would make preferences depend on exact arithmetic, which a few-million-parameter
    model does not have; clearly wrong answers are what preference data mostly contains, and they let DPO and a
    reward model learn something a tiny model can generalize to held-out pairs.
    """
    while True:
        wrong = rng.randrange(0, max_sum + 1)
        if abs(wrong - answer) >= 5:
            return wrong


def make_rows(task: str, split: str, num_rows: int | None = None, seed: int = 0, max_operand: int = 99) -> list[dict]:
    """Rows of ``task`` for ``split`` as plain Python dicts."""
    if task not in TASKS:
        raise ValueError(f"Unknown built-in task {task!r}. Available: {', '.join(TASKS)}.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r} for built-in task {task!r}. Available: {', '.join(SPLITS)}.")
    num_rows = DEFAULT_ROWS[split] if num_rows is None else num_rows
    rng = random.Random(f"{seed}:{split}:wrong")
    rows = []
    for a, b, template in _pairs(split, num_rows, seed, max_operand):
        question = QUESTION_TEMPLATES[template].format(a=a, b=b)
        answer = a + b
        prompt = [{"role": "user", "content": question}]
        if task == "arithmetic":
            rows.append({"messages": prompt + [{"role": "assistant", "content": str(answer)}], "answer": str(answer)})
        elif task == "arithmetic-completion":
            rows.append({"prompt": f"{a} + {b} =", "completion": f" {answer}"})
        elif task == "arithmetic-text":
            rows.append({"text": f"{a} + {b} = {answer}"})
        elif task == "arithmetic-preference":
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": str(answer)}],
                    "rejected": [{"role": "assistant", "content": str(_wrong_answer(answer, rng, 2 * max_operand))}],
                    "answer": str(answer),
                }
            )
        else:  # arithmetic-prompts
            rows.append({"prompt": prompt, "answer": str(answer)})
    return rows


def load_task(task: str, split: str, num_rows: int | None = None, seed: int = 0) -> datasets.Dataset:
    """A built-in task split as a ``datasets.Dataset`` (in memory, no network, no cache files)."""
    return datasets.Dataset.from_list(make_rows(task, split, num_rows=num_rows, seed=seed))
