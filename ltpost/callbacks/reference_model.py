"""ReferenceModel: owns the reference policy; modules only ask it for reference log-probs.

Modes, from cheapest to most general:

- ``adapter``: the policy is a PEFT model; the reference is the same model with its adapters disabled. No second
  copy in memory, one extra no-grad forward per step.
- ``precompute``: before training, the reference log-probs of every train and eval example are computed once (by
  the initial policy, or by ``model`` when given, which is then freed) and looked up by example index afterwards.
  No second model in memory and no reference forward during training; the table rides in the checkpoint, so a
  resumed run reuses it.
- ``copy``: a frozen copy of the initial policy (or of ``model``). One extra model in memory and one no-grad
  forward per step. On resume it is rebuilt from its source, not from the (already trained) policy.
- ``sync``: a copy that follows the policy (TR-DPO): every ``sync_steps`` optimizer steps,
  ``ref = alpha * policy + (1 - alpha) * ref``. Its weights ride in the checkpoint so a resumed run continues
  from the same reference.

``auto`` picks ``adapter`` for a PEFT policy and ``precompute`` otherwise: both are exact for a fixed reference
and neither keeps a second model in memory. Online methods (GRPO, RLOO) sample their completions during training,
so nothing can be precomputed: for them ``auto`` picks ``copy`` unless the policy is PEFT.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from ltpost.strategies import gathered_fsdp1, is_sharded, no_grad_for

log = logging.getLogger(__name__)

Mode = Literal["auto", "copy", "adapter", "precompute", "sync"]
# compute(model, batch) -> per-example reference values, e.g. [B, 2] (chosen, rejected) sequence log-probs.
ComputeFn = Callable[[torch.nn.Module, dict[str, Any]], Tensor]


def resolve_mode(mode: Mode, policy_is_peft: bool, has_separate_model: bool, precomputable: bool = True) -> str:
    """The concrete mode for ``auto``; a ``ValueError`` for impossible combinations.

    ``precomputable`` is False for online methods, whose completions do not exist before training: ``auto`` then
    falls back to ``copy``.
    """
    if mode == "precompute" and not precomputable:
        raise ValueError(
            "ReferenceModel(mode='precompute') needs a fixed dataset of completions; this module samples them online. "
            "Use mode='copy' (or 'adapter' with a LoRA policy)."
        )
    if mode == "adapter" and not policy_is_peft:
        raise ValueError(
            "ReferenceModel(mode='adapter') needs a PEFT policy (use_peft=True); use 'precompute' or 'copy'."
        )
    if mode == "adapter" and has_separate_model:
        raise ValueError("mode='adapter' uses the policy's own base weights; it cannot use a separate reference model.")
    if mode != "auto":
        return mode
    if policy_is_peft and not has_separate_model:
        return "adapter"
    return "precompute" if precomputable else "copy"


def should_sync(global_step: int, last_synced_step: int, sync_steps: int) -> bool:
    """TR-DPO: sync after every ``sync_steps``-th optimizer step, once per step (not per micro-batch)."""
    return global_step > last_synced_step and global_step % sync_steps == 0


@torch.no_grad()
def mix_into(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """``ref = alpha * policy + (1 - alpha) * ref`` for every floating-point parameter, in place."""
    for ref_param, policy_param in zip(reference.parameters(), policy.parameters(), strict=True):
        if ref_param.dtype.is_floating_point:
            ref_param.lerp_(policy_param.detach().to(ref_param.dtype), alpha)


class ReferenceModel(Callback):
    """The reference policy for DPO-style losses and KL terms, in one of several memory/compute trade-offs.

    A module asks for reference values with ``reference_values(pl_module, batch, compute, split)``, where
    ``compute(model, batch)`` runs ``model`` on the batch and returns per-example values (e.g. ``[B, 2]`` chosen
    and rejected sequence log-probs). Batches used with ``precompute`` carry ``example_index`` (``[B]`` row
    indices into the datamodule's dataset). Modules that need it return one from ``configure_callbacks()``
    unless the user configured one.

    Args:
        mode: ``auto``, ``adapter``, ``precompute``, ``copy`` or ``sync`` (see the module docstring).
        model: a separate reference checkpoint (hub id, path or built-in name); default: the initial policy.
        sync_steps: TR-DPO: optimizer steps between syncs (``sync`` mode).
        sync_alpha: TR-DPO: weight of the policy in each sync (``sync`` mode).
        precompute_batch_size: rows per forward while precomputing; defaults to the datamodule's eval batch size.
    """

    def __init__(
        self,
        mode: Mode = "auto",
        model: str | None = None,
        sync_steps: int = 512,
        sync_alpha: float = 0.6,
        precompute_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("auto", "copy", "adapter", "precompute", "sync"):
            raise ValueError(f"Unknown ReferenceModel mode {mode!r}; choose auto, adapter, precompute, copy or sync.")
        if sync_steps < 1:
            raise ValueError(f"sync_steps must be >= 1, got {sync_steps}.")
        if not 0.0 < sync_alpha <= 1.0:
            raise ValueError(f"sync_alpha must be in (0, 1], got {sync_alpha}.")
        self.mode = mode
        self.model_name = model
        self.sync_steps = sync_steps
        self.sync_alpha = sync_alpha
        self.precompute_batch_size = precompute_batch_size
        self.resolved_mode: str | None = None
        self.reference: torch.nn.Module | None = None
        self.tables: dict[str, Tensor] = {}  # split -> [num_examples, K] precomputed values
        self.last_synced_step = 0
        self.num_syncs = 0
        self._restored_reference_state: dict[str, Tensor] | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.model_name is None:
            self.model_name = getattr(pl_module, "reference_model_name", None)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_ready(trainer, pl_module, splits=("train", "eval"))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_ready(trainer, pl_module, splits=("eval",))

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_ready(trainer, pl_module, splits=("eval",))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if self.resolved_mode != "sync" or not should_sync(trainer.global_step, self.last_synced_step, self.sync_steps):
            return
        mix_into(self.reference, pl_module.model, self.sync_alpha)
        self.last_synced_step = trainer.global_step
        self.num_syncs += 1
        pl_module.log("ref/num_syncs", float(self.num_syncs), batch_size=1)

    def _ensure_ready(self, trainer: pl.Trainer, pl_module: pl.LightningModule, splits: tuple[str, ...]) -> None:
        if self.resolved_mode is None:
            policy = pl_module.model
            self.resolved_mode = resolve_mode(
                self.mode,
                hasattr(policy, "disable_adapter"),
                self.model_name is not None,
                getattr(pl_module, "reference_precomputable", True),
            )
            log.info(
                f"ReferenceModel: mode {self.resolved_mode!r}" + (f" from {self.model_name}" if self.model_name else "")
            )
        if self.resolved_mode in ("copy", "sync") and self.reference is None:
            # sync mixes parameters one to one, so it copies the policy's exact structure (adapters included);
            # its weights come back from the checkpoint on resume.
            self.reference = self._build_reference(pl_module, from_source=self.resolved_mode == "copy")
            if self._restored_reference_state is not None:
                self.reference.load_state_dict(self._restored_reference_state)
                self._restored_reference_state = None
        if self.resolved_mode == "precompute":
            missing = [s for s in splits if s not in self.tables]
            if missing:
                self._precompute(trainer, pl_module, missing)

    def _build_reference(self, pl_module: pl.LightningModule, from_source: bool = True) -> torch.nn.Module:
        """A frozen reference: loaded from its source when known (exact on resume), else a copy of the policy."""
        builder = getattr(pl_module, "build_reference_model", None)
        shard = getattr(
            pl_module.trainer.strategy, "shard_frozen_copy", None
        )  # FSDP2Strategy: shard it like the policy
        if builder is not None and from_source:
            reference = builder(self.model_name)
        elif shard is not None or is_sharded(pl_module.model):
            raise ValueError(
                f"ReferenceModel(mode={self.resolved_mode!r}) copies the policy's structure, which the strategy "
                f"({type(pl_module.trainer.strategy).__name__}) has already sharded; use mode='copy' (rebuilt from its "
                "source) or 'adapter' with LoRA."
            )
        else:
            reference = copy.deepcopy(pl_module.model)
        reference.requires_grad_(False)
        if shard is not None:
            reference = shard(reference)
        reference.to(pl_module.device).eval()
        return reference

    # -- the one question modules ask ----------------------------------------------------------------------------

    def reference_values(
        self, pl_module: pl.LightningModule, batch: dict[str, Any], compute: ComputeFn, split: str = "train"
    ) -> Tensor:
        """Reference values for ``batch`` (no gradient): looked up, or computed by the reference in its mode."""
        mode = self.resolved_mode
        if mode is None:
            raise RuntimeError("ReferenceModel is not ready: it is set up by the Trainer (fit/validate/test).")
        if mode == "precompute":
            table = self.tables[split]
            return table[batch["example_index"].to(table.device)].to(pl_module.device)
        # Inference mode where it is allowed (cheaper than no_grad: no version counters or view tracking); the clone makes a
        # normal tensor that the loss may save for backward.
        with no_grad_for(pl_module.model):
            if mode == "adapter":
                with pl_module.model.disable_adapter():
                    values = compute(pl_module.model, batch)
            else:
                values = compute(self.reference, batch)
        return values.clone()

    # -- precompute ----------------------------------------------------------------------------------------------

    def _precompute(self, trainer: pl.Trainer, pl_module: pl.LightningModule, splits: list[str]) -> None:
        # FSDP1 gathers the root's parameters only inside a step; this runs before the first one.
        with no_grad_for(pl_module.model), gathered_fsdp1(trainer.strategy.model, recurse=False):
            self._precompute_tables(trainer, pl_module, splits)

    def _precompute_tables(self, trainer: pl.Trainer, pl_module: pl.LightningModule, splits: list[str]) -> None:
        """Fill ``self.tables[split]`` for each split, each rank computing a strided shard, then all-gathered."""
        datamodule = trainer.datamodule
        compute = getattr(pl_module, "reference_compute", None)
        if datamodule is None or compute is None:
            raise ValueError(
                "ReferenceModel(mode='precompute') needs a datamodule (with train_dataset/eval_dataset/collate) and a "
                "module with `reference_compute(model, batch)`. Use mode='copy' otherwise."
            )
        # The policy is the reference only while provably untouched (fitting, before the first step). Otherwise
        # (e.g. `validate` on a trained module in a new Trainer) the reference is rebuilt from its source.
        untouched = trainer.state.fn == TrainerFn.FITTING and trainer.global_step == 0
        if self.model_name is None and untouched:
            model = pl_module.model
        elif self.model_name is None and not hasattr(pl_module, "build_reference_model"):
            raise ValueError(
                "ReferenceModel(mode='precompute') cannot tell what the reference is: the policy has already been "
                "trained and the module has no build_reference_model(). Resume from the checkpoint (it holds the "
                "table) or set ReferenceModel(model=...)."
            )
        else:
            model = self._build_reference(pl_module)
        was_training = model.training
        model.eval()
        rank, world = trainer.global_rank, trainer.world_size
        for split in splits:
            dataset = datamodule.train_dataset if split == "train" else datamodule.eval_dataset
            if dataset is None:
                continue
            indices = list(range(rank, len(dataset), world))
            # Every rank runs the same number of forwards (a sharded model's forward is a collective): a rank short
            # of rows repeats its first one, which writes the same value into the same row again.
            indices += indices[:1] * (-(-len(dataset) // world) - len(indices))
            batch_size = self.precompute_batch_size or getattr(datamodule, "eval_batch_size", 8)
            loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=datamodule.collate)
            table: Tensor | None = None
            for batch in loader:
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                values = compute(model, batch).float()  # [B, K]
                if table is None:
                    table = torch.full((len(dataset), values.shape[-1]), float("nan"), device=pl_module.device)
                table[batch["example_index"]] = values
            if world > 1:  # every rank holds NaN where another rank computed: gather and merge
                gathered = pl_module.all_gather(table)  # [W, N, K]
                table = torch.nan_to_num(gathered, nan=0.0).sum(0)  # each row is filled on exactly one rank
            self.tables[split] = table.cpu()
            log.info(f"ReferenceModel: precomputed reference values for {len(dataset)} {split} examples")
        model.train(was_training)
        if model is not pl_module.model:
            del model

    # -- checkpoint state ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "resolved_mode": self.resolved_mode,
            "tables": self.tables,
            "last_synced_step": self.last_synced_step,
            "num_syncs": self.num_syncs,
        }
        if self.resolved_mode == "sync" and self.reference is not None:
            state["reference_state"] = {k: v.detach().cpu() for k, v in self.reference.state_dict().items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resolved_mode = state_dict.get("resolved_mode")
        self.tables = state_dict.get("tables", {})
        self.last_synced_step = state_dict.get("last_synced_step", 0)
        self.num_syncs = state_dict.get("num_syncs", 0)
        self._restored_reference_state = state_dict.get("reference_state")
