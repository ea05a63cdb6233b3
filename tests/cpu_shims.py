"""Test-only CPU shims for the CUDA-only presets (shared/notes/distributed-on-cpu.md), so their wiring runs here.

Lightning refuses DeepSpeed without a CUDA accelerator, and gives ``deepspeed.initialize`` the root device's index,
which a CPU device has not. These subclasses of ltpost's own presets skip that check and pass the local rank;
everything else (ltpost's preset settings, ZeRO partitioning, checkpoints, ltpost's gathering for generation and
export) is the code users run on GPUs. DeepSpeed picks its CPU accelerator from ``DS_ACCELERATOR=cpu`` (set by the
launch in tests/distributed.py) and compiles a small communication op on first use (cached under
``TORCH_EXTENSIONS_DIR``). ``FSDP1Strategy`` needs no shim: it wraps with the root device itself.
"""

from __future__ import annotations

import argparse

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy

from ltpost.strategies import DeepSpeedZeRO2Strategy, DeepSpeedZeRO3Strategy


class _OnCPU:
    def setup_environment(self) -> None:
        # DeepSpeedStrategy.setup_environment only adds the CUDA check before DDP's (device, then distributed).
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # As DeepSpeedStrategy's, less its check that every device has a CUDA index.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer


class CPUDeepSpeedZeRO2Strategy(_OnCPU, DeepSpeedZeRO2Strategy):
    pass


class CPUDeepSpeedZeRO3Strategy(_OnCPU, DeepSpeedZeRO3Strategy):
    pass
