"""VLLMSync: push the policy's weights into the vLLM rollout engine after optimizer steps.

Online methods sample with ``pl_module.rollout_engine``. The Hugging Face engine generates with the policy itself
and needs nothing; a vLLM engine holds its own copy of the weights, which this callback refreshes:

- when: after an optimizer step, at most once per step (``on_train_batch_end`` fires after every micro-batch,
  but ``trainer.global_step`` moves only when the optimizer steps, so gradient accumulation's micro-steps push
  nothing), every ``every_n_steps`` steps (``should_push``). Also once when training starts (the engine may have
  been started from another checkpoint, or the run resumed) and before a validation whose engine is behind, so
  ``eval/`` metrics are the current policy's;
- what: the policy under its Hugging Face names, with LoRA adapters merged first and unmerged afterwards, FSDP2
  ``DTensor`` parameters gathered (``full_tensor``) and DeepSpeed ZeRO-3 parameters gathered
  (``GatheredParameters``), see ``ltpost.rollout.weights``;
- who: every rank into its own engine (colocate), or rank 0 into a shared server while the others join the
  gathers and then wait at a barrier (``engine.shared_across_ranks``).

It logs ``vllm/sync_s`` (seconds spent in the push, gathering and merging included) and ``vllm/policy_version``
(the optimizer step whose weights the engine holds) and keeps both in its ``state_dict``, so a resumed run carries
on. ``GRPOModule`` and ``RLOOModule`` add one automatically when ``use_vllm`` is set and none was given.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from ltpost.rollout.weights import policy_weights

log = logging.getLogger(__name__)


def should_push(global_step: int, pushed_step: int, every_n_steps: int) -> bool:
    """After optimizer step ``global_step``: push when the engine holds an older step's weights and the step is a
    multiple of ``every_n_steps`` (so micro-steps of the same optimizer step never push twice)."""
    return global_step > pushed_step and global_step % every_n_steps == 0


def engine_needs_weights(engine: Any) -> bool:
    """False for engines that generate with the policy's own parameters (the Hugging Face engine)."""
    return engine is not None and not getattr(engine, "generates_with_policy", False)


class VLLMSync(Callback):
    """Keeps the vLLM rollout engine's weights equal to the policy's.

    Args:
        every_n_steps: optimizer steps between pushes (1: after every step). Between pushes the engine samples with
            older weights; the importance-sampling correction (``vllm_importance_sampling_correction``) then
            accounts for the gap.
        sync_on_train_start: push once when training starts (default True; the engine may hold other weights
            than the policy's, e.g. a server started from the base checkpoint, or a resumed run).
        sync_before_validation: push before a validation when the engine is behind (default True).
    """

    def __init__(self, every_n_steps: int = 1, sync_on_train_start: bool = True, sync_before_validation: bool = True):
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}.")
        self.every_n_steps = every_n_steps
        self.sync_on_train_start = sync_on_train_start
        self.sync_before_validation = sync_before_validation
        self.policy_version = -1  # the optimizer step whose weights the engine holds; -1: not pushed by us yet
        self.num_syncs = 0
        self.last_sync_seconds = 0.0
        self.total_sync_seconds = 0.0

    # -- hooks ---------------------------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sync_on_train_start:
            self.push(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if not should_push(trainer.global_step, self.policy_version, self.every_n_steps):
            return
        if self.push(trainer, pl_module):
            pl_module.log("vllm/sync_s", self.last_sync_seconds, batch_size=1)
            pl_module.log("vllm/policy_version", float(self.policy_version), batch_size=1)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.sync_before_validation:
            return
        if trainer.global_step != self.policy_version:
            self.push(trainer, pl_module)

    # -- the push ------------------------------------------------------------------------------------------------

    def push(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Push the policy's current weights into ``pl_module.rollout_engine``; False (and nothing done) when the
        engine needs none. Every rank must call it (gathers are collectives)."""
        engine = getattr(pl_module, "rollout_engine", None)
        if not engine_needs_weights(engine):
            return False
        start = time.perf_counter()
        sends = trainer.is_global_zero or not getattr(engine, "shared_across_ranks", False)
        with policy_weights(pl_module.model, trainer.strategy.model) as weights:
            if sends:
                engine.load_weights(weights)
            else:
                for _ in weights:  # join the collective gathers (FSDP2) without sending anything
                    pass
        if trainer.world_size > 1 and getattr(engine, "shared_across_ranks", False):
            trainer.strategy.barrier("vllm_sync")  # no rank samples from the server before the new weights are in
        self.last_sync_seconds = time.perf_counter() - start
        self.total_sync_seconds += self.last_sync_seconds
        self.policy_version = trainer.global_step
        self.num_syncs += 1
        log.debug(f"VLLMSync: pushed step {self.policy_version} in {self.last_sync_seconds:.3f} s")
        return True

    # -- checkpoint state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"policy_version": self.policy_version, "num_syncs": self.num_syncs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.policy_version = state_dict.get("policy_version", -1)
        self.num_syncs = state_dict.get("num_syncs", 0)
