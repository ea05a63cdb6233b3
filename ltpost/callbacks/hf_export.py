"""HFExport: write the trained model as a Hugging Face folder that ``from_pretrained`` loads back."""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor

from ltpost.rollout.weights import gathered_zero3, is_peft_model, policy_weights
from ltpost.strategies import base_model, is_sharded

log = logging.getLogger(__name__)


def gathered_state_dict(model: torch.nn.Module, root: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict with FSDP2 ``DTensor`` entries gathered (a collective: every rank calls it).

    DeepSpeed ZeRO-3 parameters are gathered too, and FSDP1's units when ``root`` (``trainer.strategy.model``) is
    FSDP1's root. Tied parameters (an input embedding shared with the head) stay one tensor under both names, so
    ``save_pretrained`` writes it once, as it does for an unsharded model.
    """
    if isinstance(root, FullyShardedDataParallel):
        if is_peft_model(model):
            raise NotImplementedError(
                "HFExport cannot write a LoRA adapter from under FSDP1Strategy: PEFT picks the adapter's entries by "
                "module path, which FSDP1's wrappers change. Use FSDP2Strategy (LoRA export tested) or DDP, or "
                "HFExport(merge_lora=True) for full weights with the adapters merged (works under FSDP1)."
            )
        return fsdp1_full_state_dict(root, model)
    gathered: dict[int, torch.Tensor] = {}
    state_dict = {}
    with gathered_zero3(model):  # DeepSpeed ZeRO-3: partitioned parameters gathered (copied out) while it lasts
        for name, value in model.state_dict(keep_vars=True).items():
            if id(value) not in gathered:
                tensor = value.full_tensor() if isinstance(value, DTensor) else value
                gathered[id(value)] = tensor.detach().clone() if hasattr(value, "ds_id") else tensor.detach()
            state_dict[name] = gathered[id(value)]
    return state_dict


def fsdp1_full_state_dict(root: FullyShardedDataParallel, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s full state dict from under FSDP1's root (the wrapped LightningModule), on every rank.

    Only the root can gather it: FSDP1 keeps the parameters outside every layer unit (embeddings, norm, head) in the
    root's flat parameter, so the model's own ``state_dict()`` would return their local shards. The entries of a
    tied head, gathered as separate copies, are made one tensor again so ``save_pretrained`` writes it once.
    """
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType

    prefix = next(name for name, module in root.module.named_modules() if module is model) + "."
    config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
    with FullyShardedDataParallel.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
        full = root.state_dict()
    state_dict = {name[len(prefix) :]: value for name, value in full.items() if name.startswith(prefix)}
    # Which names share one parameter (tied), from the model itself (FSDP1 adds a wrapper level to layer names).
    own = model.named_parameters(remove_duplicate=False)
    first_name: dict[int, str] = {}
    for name, value in own:
        name = name.replace("_fsdp_wrapped_module.", "")
        if name in state_dict:
            first = first_name.setdefault(id(value), name)
            state_dict[name] = state_dict[first]
    return state_dict


class HFExport(Callback):
    """Save ``pl_module.model`` and its tokenizer (chat template included) as a Hugging Face folder.

    The module must expose the Hugging Face model as ``model`` (and may expose ``tokenizer``; the datamodule's
    tokenizer, which carries any chat template override, wins). A PEFT model is saved as an adapter folder,
    which ``AutoModelForCausalLM.from_pretrained`` loads together with its base; ``merge_lora=True`` instead
    saves full weights with the adapters merged (costs one extra copy of the model in host memory while it
    runs; the trainer's own model keeps its adapters unmerged; on a sharded model the adapters are merged into the
    shards in place and unmerged after, as for a vLLM push). Sharded weights (FSDP2, FSDP1, ZeRO-3) are gathered on
    every rank and written by rank zero.

    Args:
        dirpath: output folder; defaults to ``<log_dir>/hf_model``.
        merge_lora: save merged full weights instead of a PEFT adapter.
        on_checkpoint: also export beside each checkpoint Lightning saves, into ``<dirpath>/step-<N>``.
        safe_serialization: write safetensors (True) or PyTorch pickles.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        merge_lora: bool = False,
        on_checkpoint: bool = False,
        safe_serialization: bool = True,
    ) -> None:
        super().__init__()
        self.dirpath = dirpath
        self._configured_dirpath = dirpath
        self.merge_lora = merge_lora
        self.on_checkpoint = on_checkpoint
        self.safe_serialization = safe_serialization
        self.last_export: str | None = None

    @property
    def state_key(self) -> str:
        # Several exports may coexist (e.g. an adapter and a merged copy); each needs its own checkpoint slot.
        return f"HFExport{{dirpath={self._configured_dirpath!r}, merge_lora={self.merge_lora}}}"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            root = trainer.log_dir if trainer.logger is not None else trainer.default_root_dir
            self.dirpath = os.path.join(root or ".", "hf_model")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.export(trainer, pl_module, self.dirpath)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.on_checkpoint and not trainer.sanity_checking:
            self.export(trainer, pl_module, os.path.join(self.dirpath, f"step-{trainer.global_step}"))

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dirpath: str) -> None:
        """Write the folder; every rank must call it (gathering sharded weights is collective)."""
        model = getattr(pl_module, "model", None)
        if model is None or not hasattr(model, "save_pretrained"):
            raise TypeError(
                f"HFExport needs the module to hold a Hugging Face model in `.model`; {type(pl_module).__name__} does not."
            )
        root = trainer.strategy.model
        merge = self.merge_lora and is_peft_model(model)
        if merge and is_sharded(model):
            # No whole copy to merge on a sharded model: merge the adapters into the shards in place (as VLLMSync
            # does), gather the merged weights under the base model's names, and unmerge (the trainer's base weights
            # come back to about 1e-7 relative).
            with policy_weights(model, root) as weights:
                state_dict = {name: tensor.detach().clone() for name, tensor in weights}
            model = base_model(model)
        elif merge:
            state_dict = None  # rank 0 merges a copy below
        else:
            state_dict = gathered_state_dict(model, root)
        if not trainer.is_global_zero:
            return
        if merge and state_dict is None:
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(dirpath, state_dict=state_dict, safe_serialization=self.safe_serialization)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        tokenizer = tokenizer or getattr(pl_module, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(dirpath)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and tokenizer is not None:
            generation_config.eos_token_id = tokenizer.eos_token_id
            generation_config.pad_token_id = tokenizer.pad_token_id
            generation_config.save_pretrained(dirpath)
        self.last_export = dirpath
        log.info(f"Exported a Hugging Face model to {dirpath}")

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": self.dirpath, "last_export": self.last_export}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_export = state_dict.get("last_export")
