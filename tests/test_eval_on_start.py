"""EvalOnStart: the sanity-check validation of the initial model lands in the logs at step 0."""

from __future__ import annotations

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ltpost import EvalOnStart, SFTDataModule, SFTModule
from tests.helpers import cpu_trainer


def scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def data() -> SFTDataModule:
    return SFTDataModule(batch_size=4, max_train_samples=32, max_eval_samples=8, eval_batch_size=4)


def test_initial_validation_is_logged_at_step_zero(tmp_path):
    """eval/loss at step 0 is the untrained model's held-out loss (what trainer.validate gives before fit, to 1e-6),
    and the validation after 4 steps follows at a later step with a lower loss."""
    module = SFTModule(learning_rate=1e-3)
    trainer = cpu_trainer(tmp_path / "before")
    before = trainer.validate(module, datamodule=data(), verbose=False)[0]["eval/loss"]

    callback = EvalOnStart()
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = cpu_trainer(
        tmp_path, max_steps=4, val_check_interval=4, num_sanity_val_steps=-1, logger=logger, callbacks=[callback]
    )
    trainer.fit(SFTModule(learning_rate=1e-3), datamodule=data())
    points = scalars(logger.log_dir, "eval/loss")
    assert points[0][0] == 0 and points[0][1] == pytest.approx(before, abs=1e-6)
    assert callback.initial_metrics["eval/loss"] == pytest.approx(before, abs=1e-6)
    assert len(points) == 2 and points[1][0] > 0 and points[1][1] < points[0][1]


def test_partial_sanity_check_warns():
    trainer = cpu_trainer(".", num_sanity_val_steps=2)
    with pytest.warns(UserWarning, match="num_sanity_val_steps: -1"):
        EvalOnStart().setup(trainer, SFTModule(), "fit")
