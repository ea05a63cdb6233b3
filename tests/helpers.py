"""Small helpers shared by tests: a quiet CPU trainer and held-out exact match on the arithmetic task."""

from __future__ import annotations

from lightning.pytorch import Trainer

from ltpost.assets.evaluation import arithmetic_exact_match  # noqa: F401 (re-exported for the tests)


def cpu_trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    return Trainer(**{**defaults, **kwargs})


def even_token_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """Fraction of a completion's tokens with an even id: varies between completions of even a random model, and a
    policy can raise it quickly, so it drives tests that need a non-zero advantage."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def health_findings(trainer) -> list[str]:
    """What the TrainingHealth callback each module adds said during the run: the learning tests run the shipped
    configs' recipes, logged as often as the configs log, so any finding there is a false positive."""
    from ltpost import TrainingHealth

    (callback,) = [c for c in trainer.callbacks if isinstance(c, TrainingHealth)]
    return [f"{r['code']} at step {r['step']}: {r['message']}" for r in callback.records]
