"""Scaling presets: Lightning strategies set up for Hugging Face causal LMs, so a YAML picks one by name.

Every ltpost module builds its model in ``configure_model()`` and keeps it at ``self.model``; these strategies
shard that model after it is built, so no module knows how it is scaled.

- ``FSDP2Strategy``: PyTorch's ``fully_shard`` (FSDP2) over every rank, through Lightning's
  ``ModelParallelStrategy``. Each decoder layer (the classes the model names in ``_no_split_modules``) is one
  shard group and the root (embeddings, final norm, head, a tied embedding stays tied) another. Mixed precision
  is FSDP2's own policy (parameters gathered and computed in bf16, gradients reduced in fp32, fp32 master
  weights); activation checkpointing is transformers' non-reentrant one. Checkpoints are sharded folders
  (``torch.distributed.checkpoint``) by default. Runs on CPU (gloo) and GPU (NCCL).
- ``FSDP1Strategy``: the older wrapper API (``FullyShardedDataParallel``) with a transformer auto-wrap policy
  built from the same layer classes; the LightningModule is the root unit (embeddings, norm, head). Runs on CPU
  (gloo) and GPU. Prefer FSDP2: FSDP1 cannot export a LoRA adapter (PEFT's names), and generation gathers each
  layer at each token.
- ``DeepSpeedZeRO2Strategy`` / ``DeepSpeedZeRO3Strategy``: DeepSpeed ZeRO stage 2 (optimizer state and gradients
  partitioned) and 3 (parameters too), with bf16 when the Trainer's precision asks for it. They need
  ``pip install deepspeed`` and CUDA GPUs (the tests run them on CPU through a small shim). Under ZeRO-3 the model
  is loaded partitioned by transformers' own ZeRO-3 loading; a frozen reference model is built whole on each rank.

Memory of a 7B model (Qwen2.5-7B, P = 7.6e9 parameters) per GPU on 8 GPUs, by calculation: model state only
(bf16 compute, fp32 master weights and AdamW's two fp32 moments: 16 bytes per trained parameter), activations,
buffers and the CUDA context excluded:

=======================  =====================================  =========================
setup                    bytes per GPU                          8 GPUs, 7.6e9 parameters
=======================  =====================================  =========================
DDP, full fine-tuning    16 P                                   122 GB: does not fit
ZeRO-2                   2 P + 14 P / N                         15.2 + 13.3 = 28.5 GB
FSDP2 or ZeRO-3          16 P / N (+ one gathered layer)        15.2 GB (+ 0.5 GB)
QLoRA, r 16, DDP         0.5 P (NF4) + 16 x 40e6 (adapters)     3.8 + 0.6 = 4.4 GB
=======================  =====================================  =========================
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

log = logging.getLogger(__name__)

MixedPrecision = Literal["no", "bf16", "fp16"]


# -- what to shard ------------------------------------------------------------------------------------------------


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The module classes that must stay whole (the decoder layers), from the model's ``_no_split_modules``.

    transformers names them on every architecture it ships (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ...);
    a model without the attribute is refused rather than sharded as one block, which would gather it whole.
    """
    names = set(getattr(base_model(model), "_no_split_modules", None) or [])
    if not names:
        raise ValueError(
            f"{type(base_model(model)).__name__} does not name its decoder layers (`_no_split_modules` is empty), so "
            "ltpost cannot tell what to shard. Set `model._no_split_modules = ['MyDecoderLayer']` in configure_model."
        )
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(f"None of the layer classes {sorted(names)} occurs in {type(model).__name__}.")
    return classes


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    classes = tuple(layer_classes(model))
    return [m for m in model.modules() if isinstance(m, classes)]


def mixed_precision_policy(mixed_precision: MixedPrecision):
    """FSDP2's policy: parameters gathered in the low precision, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "no":
        return MixedPrecisionPolicy()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def shard_with_fsdp2(
    model: nn.Module,
    mesh,
    mixed_precision: MixedPrecision = "no",
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> nn.Module:
    """``fully_shard`` every decoder layer, then the root (embeddings, norm, head), in place; returns ``model``."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    kwargs: dict[str, Any] = dict(
        mesh=mesh,
        mp_policy=mixed_precision_policy(mixed_precision),
        offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    )
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
        layer._ltpost_reshard_after_forward = reshard_after_forward  # put back after generation
    base = base_model(model)
    head = getattr(base, "score", None)
    if isinstance(head, nn.Module) and isinstance(getattr(base, base.base_model_prefix, None), nn.Module):
        # A sequence classifier (reward model) is run as backbone, then head on the chosen positions
        # (ltpost.modules.reward.sequence_scores), never through its own forward: each needs its own unit, whose
        # hooks gather it when it is called.
        for unit in (getattr(base, base.base_model_prefix), head):
            fully_shard(unit, reshard_after_forward=False, **kwargs)
            unit._ltpost_reshard_after_forward = False
    # The root is gathered for the whole forward anyway (embeddings first, head last): keep it gathered.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    model._ltpost_reshard_after_forward = False
    log.info(f"FSDP2: sharded {len(layers)} decoder layers and the root over {mesh.size()} ranks")
    return model


def sharding_of(model: nn.Module) -> Literal["fsdp2", "fsdp1", "zero3"] | None:
    """How ``model``'s parameters are split over ranks: FSDP2 (``DTensor`` parameters), FSDP1 (wrapped units
    inside it), DeepSpeed ZeRO-3 (partitioned parameters), or not at all (``None``: DDP, ZeRO-2, one device)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    parameters = list(model.parameters())
    if any(isinstance(p, DTensor) for p in parameters):
        return "fsdp2"
    if any(hasattr(p, "ds_id") for p in parameters):
        return "zero3"
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return "fsdp1"
    return None


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded over ranks (FSDP2, FSDP1 or ZeRO-3): each of its forwards is then
    a collective, so ranks must run the same number of them."""
    return sharding_of(model) is not None


def no_grad_for(model: nn.Module):
    """``torch.inference_mode()`` (the cheaper one), or ``torch.no_grad()`` for a sharded model: FSDP and ZeRO-3
    gather parameters into buffers they reuse in training, and buffers made in inference mode cannot be."""
    return torch.no_grad() if is_sharded(model) else torch.inference_mode()


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module) -> Iterator[None]:
    """Keep an FSDP2 model's parameters gathered for a whole ``generate`` call, then shard them again.

    Without this, every generated token re-gathers every layer (one all-gather per layer per token). Inside, each
    rank holds the full weights once (the memory of an unsharded model, for the length of the call). Each unit's
    own ``reshard_after_forward`` comes back afterwards. FSDP1 and ZeRO-3 models are left to gather layer by layer
    (slower; use FSDP2 or vLLM for rollouts at scale); nothing happens for a model that is not sharded.
    """
    from torch.distributed.fsdp import FSDPModule

    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not fsdp_modules:
        yield
        return
    for module in fsdp_modules:
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for module in fsdp_modules:
            module.reshard()
            module.set_reshard_after_forward(reshard_after_forward_of(module, model), recurse=False)


def reshard_after_forward_of(unit: nn.Module, root: nn.Module) -> bool:
    """The ``reshard_after_forward`` a unit was sharded with (recorded by ``shard_with_fsdp2``; FSDP2's default
    otherwise: True, except the root)."""
    return getattr(unit, "_ltpost_reshard_after_forward", unit is not root)


@contextlib.contextmanager
def gathered_fsdp1(root: nn.Module | None, recurse: bool = True) -> Iterator[None]:
    """Under FSDP1, gather parameters read-only for calls to the model outside a training or validation step.

    FSDP1 wraps the LightningModule as the root unit, and gathers the root's own parameters (embeddings, final
    norm, head: those outside every decoder-layer unit) only around ``training_step`` / ``validation_step``.
    ``recurse=False`` gathers just those (enough to run forwards: the layer units gather themselves; costs their
    memory), ``recurse=True`` every unit (a full copy per rank, to read all weights). ``root`` is
    ``trainer.strategy.model``; anything but an FSDP1 root passes through.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not isinstance(root, FullyShardedDataParallel):
        yield
        return
    with FullyShardedDataParallel.summon_full_params(root, recurse=recurse, writeback=False):
        yield


def check_all_trainable_sharded(module: nn.Module) -> None:
    """Every trainable parameter must be a ``DTensor``: a plain one would get no gradient reduction (silently
    diverging replicas). Raises with the parameter names otherwise."""
    from torch.distributed.tensor import DTensor

    plain = [n for n, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if plain:
        raise RuntimeError(
            f"FSDP2Strategy: {len(plain)} trainable parameters are outside every shard group and would not be "
            f"reduced across ranks: {plain[:5]}. Keep the trained model at `self.model` (ltpost's modules do), or "
            "shard the extra modules yourself in configure_model with torch.distributed.fsdp.fully_shard."
        )


# -- FSDP2 --------------------------------------------------------------------------------------------------------


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallelism (FSDP2, ``fully_shard``) over every rank, set up for ltpost's modules.

    Args:
        mixed_precision: ``no`` (fp32), ``bf16`` or ``fp16``: FSDP2 gathers parameters in this dtype and computes in
            it, reduces gradients in fp32 and keeps fp32 master weights. Use it with the Trainer's
            ``precision: 32-true`` (``bf16-mixed`` autocast instead works too, with ``mixed_precision: no``).
        activation_checkpointing: recompute each decoder layer's activations in backward (transformers'
            non-reentrant checkpointing): about a third more compute for activations of one layer instead of all.
        reshard_after_forward: free each layer's gathered parameters after its forward (ZeRO-3 memory; backward
            gathers them again). False keeps them gathered from forward to backward (ZeRO-2-like: faster, more
            memory).
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory (GPU only).
        shard_reference: shard a ``ReferenceModel(mode='copy'/'sync')`` copy the same way (frozen, no optimizer
            state); False keeps a whole copy on every rank (no gathers in its forward, more memory).
        save_distributed_checkpoint: each rank writes its own shard (a checkpoint folder); False gathers full
            weights and optimizer state on rank 0 into one file.
        process_group_backend: ``nccl``/``gloo``; default: by device.
        timeout: for collectives.
    """

    def __init__(
        self,
        mixed_precision: MixedPrecision = "no",
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
        shard_reference: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
    ) -> None:
        if mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {mixed_precision!r}.")
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.mixed_precision = mixed_precision
        self.activation_checkpointing = activation_checkpointing
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload
        self.shard_reference = shard_reference

    def setup_environment(self) -> None:
        # Pure data parallelism: one mesh dimension over every rank of every node (Lightning's default would
        # spend the ranks of a node on tensor parallelism).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer) -> None:
        pl_module = self.lightning_module
        model = getattr(pl_module, "model", None)
        if not isinstance(model, nn.Module):
            raise TypeError(
                "FSDP2Strategy shards the LightningModule's `self.model`, set in configure_model(); "
                f"{type(pl_module).__name__}.model is {type(model).__name__}."
            )
        if not is_sharded(model):
            if self.activation_checkpointing:
                base_model(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.shard(model)
        check_all_trainable_sharded(pl_module)
        super().setup(trainer)

    def shard(self, model: nn.Module) -> nn.Module:
        """Shard ``model`` over the data-parallel ranks with this strategy's settings (in place)."""
        return shard_with_fsdp2(
            model,
            self.device_mesh["data_parallel"],
            self.mixed_precision,
            self.reshard_after_forward,
            self.cpu_offload,
        )

    def shard_frozen_copy(self, model: nn.Module) -> nn.Module:
        """The reference model: sharded like the policy when ``shard_reference``, else left whole (per rank)."""
        if not self.shard_reference:
            return model
        return self.shard(model.to(self.root_device))


# -- FSDP1 --------------------------------------------------------------------------------------------------------


class FSDP1Strategy(FSDPStrategy):
    """FSDP1 (``FullyShardedDataParallel``) with one wrap unit per decoder layer, found from the model itself.

    Args:
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3), ``SHARD_GRAD_OP`` (ZeRO-2), ``HYBRID_SHARD``, ``NO_SHARD``.
        activation_checkpointing: recompute every decoder layer's activations in backward (transformers').
        state_dict_type: ``sharded`` (a folder of shards) or ``full`` (one file on rank 0).
        kwargs: anything else ``lightning.pytorch.strategies.FSDPStrategy`` takes (``cpu_offload``,
            ``mixed_precision``...).

    The wrap policy needs the layer classes, known only once ``configure_model`` has built the model, so this
    strategy wraps the LightningModule itself in ``setup`` (with the arguments Lightning would use), and
    Lightning's own wrapping then finds it wrapped. Wrapping here also passes the root device as FSDP's
    ``device_id`` on CPU too, where Lightning passes none (and FSDP then cannot place the flat parameters), so the
    same code path runs under gloo in the tests.
    """

    def __init__(
        self,
        sharding_strategy: str = "FULL_SHARD",
        activation_checkpointing: bool = False,
        state_dict_type: Literal["full", "sharded"] = "sharded",
        **kwargs: Any,
    ) -> None:
        super().__init__(sharding_strategy=sharding_strategy, state_dict_type=state_dict_type, **kwargs)
        self._ltpost_activation_checkpointing = activation_checkpointing

    def setup(self, trainer) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        pl_module = self.lightning_module
        model = getattr(pl_module, "model", None)
        if not isinstance(model, nn.Module):
            raise TypeError(
                "FSDP1Strategy wraps the decoder layers of the LightningModule's `self.model`, set in "
                f"configure_model(); {type(pl_module).__name__}.model is {type(model).__name__}."
            )
        already_wrapped = any(isinstance(m, FullyShardedDataParallel) for m in self.model.modules())
        if not already_wrapped:
            if self._ltpost_activation_checkpointing:  # transformers' own, as under FSDP2 and DeepSpeed
                base_model(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            policy = self.kwargs.pop("auto_wrap_policy", None) or ModuleWrapPolicy(layer_classes(model))
            self.model = FullyShardedDataParallel(
                module=self.precision_plugin.convert_module(self.model),
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=self.root_device,
                auto_wrap_policy=policy,
                **self.kwargs,
            )
        super().setup(trainer)


# -- DeepSpeed ----------------------------------------------------------------------------------------------------


class _DeepSpeedPreset(DeepSpeedStrategy):
    """DeepSpeed with ltpost's defaults for one ZeRO stage (CUDA only, as Lightning's DeepSpeedStrategy)."""

    stage: int = 2

    def __init__(
        self,
        offload_optimizer: bool = False,
        offload_parameters: bool = False,
        activation_checkpointing: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("overlap_comm", True)
        kwargs.setdefault("contiguous_gradients", True)
        super().__init__(
            stage=self.stage,
            offload_optimizer=offload_optimizer,
            offload_parameters=offload_parameters and self.stage == 3,
            **kwargs,
        )
        self._ltpost_activation_checkpointing = activation_checkpointing
        # Only DeepSpeed's throughput log reads it. Left unset, Lightning builds an extra train loader to guess it
        # and fails on loaders without a fixed batch size (GRPO/RLOO's prompt loader).
        self.config.setdefault("train_micro_batch_size_per_gpu", 1)

    def setup(self, trainer) -> None:
        model = getattr(self.lightning_module, "model", None)
        if self._ltpost_activation_checkpointing and isinstance(model, nn.Module):
            base_model(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        super().setup(trainer)


class DeepSpeedZeRO2Strategy(_DeepSpeedPreset):
    """ZeRO stage 2: optimizer state and gradients partitioned over ranks, parameters replicated.

    Args:
        offload_optimizer: keep the optimizer state in CPU memory (``offload_optimizer_device: cpu``).
        activation_checkpointing: transformers' non-reentrant checkpointing of every decoder layer.
        kwargs: anything else ``lightning.pytorch.strategies.DeepSpeedStrategy`` takes.
    """

    stage = 2


class DeepSpeedZeRO3Strategy(_DeepSpeedPreset):
    """ZeRO stage 3: parameters, gradients and optimizer state partitioned over ranks (gathered per layer).

    Args:
        offload_optimizer: keep the optimizer state in CPU memory.
        offload_parameters: keep the partitioned parameters in CPU memory too.
        activation_checkpointing: transformers' non-reentrant checkpointing of every decoder layer.
        kwargs: anything else ``lightning.pytorch.strategies.DeepSpeedStrategy`` takes.
    """

    stage = 3

    @contextlib.contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        """Build the model in ``configure_model`` with transformers' own ZeRO-3 loading, not Lightning's
        ``deepspeed.zero.Init`` around the hook: ``from_pretrained`` / ``from_config`` then create every layer
        partitioned and initialize or load weights into the partitions (gathering one module at a time), where under
        a bare ``zero.Init`` its weight initialization indexes empty partitions and fails. Models built later (a
        frozen reference) are built whole on each rank."""
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        # zero.Init parses the whole config, batch size included, which Lightning fills in only later; the
        # partitioning does not depend on it (Lightning defaults it to 1 the same way when it initializes).
        config = {"train_micro_batch_size_per_gpu": 1, **self.config}
        hf_config = HfDeepSpeedConfig(config)  # transformers holds a weak reference: keep it alive here
        try:
            yield
        finally:
            unset_hf_deepspeed_config()
            del hf_config
