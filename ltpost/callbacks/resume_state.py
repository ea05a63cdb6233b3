"""ResumeState: what a checkpoint needs beyond weights, optimizer and loops for a resumed run to continue exactly.

Lightning's checkpoint holds the weights, the optimizer and scheduler, the loops' progress and every callback's
``state_dict``, written by rank 0. Two things are missing for an exact continuation:

- Random number generators (torch CPU and CUDA, Python, NumPy). Sampling completions, dropout and shuffles draw
  from them. They differ per rank, so every rank's state is gathered into the checkpoint (one small
  ``all_gather_object`` per checkpoint) and each rank takes back its own.
- Per-rank state of a module (the rollout buffer of GRPO/RLOO, generated once per round and reused for
  ``steps_per_generation`` steps): a module exposes it with ``rank_state_dict()`` / ``load_rank_state_dict()``
  and it rides along the same way.

The generators are restored at ``on_train_start``, after Lightning's sanity-check validation and the data
loader's first iterator (both draw from them) and right before the first resumed step, so the resumed run draws
what the uninterrupted run drew after its checkpoint. A resume on a different number of ranks cannot restore
per-rank state: it warns and continues from fresh generators.

Data order is the other half: ltpost's train loaders are resumable (``ltpost.datamodules.resumable``).
"""

from __future__ import annotations

import io
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

CHECKPOINT_KEY = "ltpost_rank_states"


def rng_state() -> dict[str, Any]:
    # Only tensors and plain Python values, so the checkpoint loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached))
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_from_ranks(trainer: pl.Trainer, obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (a collective: every rank must call it)."""
    if trainer.world_size == 1 or not dist.is_available() or not dist.is_initialized():
        return [obj]
    # Tensors go through torch.save as bytes: all_gather_object's own pickling of tensors fails to load them back
    # on torch 2.13 ("UntypedStorage has no attribute dtype").
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, buffer.getvalue())
    return [torch.load(io.BytesIO(data), weights_only=False) for data in gathered]  # our own ranks' bytes


class ResumeState(Callback):
    """Saves every rank's random generators and module rank state; restores them right before training resumes.

    Every ltpost module adds one (``configure_callbacks``); a run without it resumes with fresh generators.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        own = {"rng": rng_state()}
        if hasattr(pl_module, "rank_state_dict"):
            own["module"] = pl_module.rank_state_dict()
        checkpoint[CHECKPOINT_KEY] = gather_from_ranks(trainer, own)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get(CHECKPOINT_KEY)
        if states is None:
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"The checkpoint holds random-generator and rollout state for {len(states)} ranks but this run has "
                f"{trainer.world_size}: it resumes with fresh generators (and regenerates a rollout round), so it will "
                "not repeat the uninterrupted run exactly. Resume on the same number of ranks for that."
            )
            return
        self._pending = states[trainer.global_rank]
        if "module" in self._pending and hasattr(pl_module, "load_rank_state_dict"):
            pl_module.load_rank_state_dict(self._pending["module"])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            set_rng_state(self._pending["rng"])
            self._pending = None
