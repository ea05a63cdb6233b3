"""Fast checks of the scaling pieces (the multi-process runs are in test_scale.py, test_resume.py, test_slurm.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

import ltpost
from ltpost.callbacks.slurm_requeue import next_hpc_checkpoint_path
from ltpost.datamodules.resumable import ResumableDataLoader, ResumableSampler
from ltpost.models import load_model
from ltpost.strategies import FSDP2Strategy, decoder_layers, layer_classes


@pytest.fixture(scope="module")
def tiny():
    return load_model("ltpost:tiny-llama")


def test_layer_classes_come_from_the_models_no_split_modules(tiny):
    assert {c.__name__ for c in layer_classes(tiny)} == {"LlamaDecoderLayer"}
    assert len(decoder_layers(tiny)) == tiny.config.num_hidden_layers


def test_a_model_that_names_no_layers_is_refused_with_the_fix(tiny):
    class Plain(torch.nn.Module):
        _no_split_modules = None

    with pytest.raises(ValueError, match="_no_split_modules"):
        layer_classes(Plain())


def test_fsdp2_strategy_rejects_an_unknown_precision():
    with pytest.raises(ValueError, match="mixed_precision"):
        FSDP2Strategy(mixed_precision="bf32")


def test_presets_are_exported():
    names = {"FSDP2Strategy", "FSDP1Strategy", "DeepSpeedZeRO2Strategy", "DeepSpeedZeRO3Strategy"}
    assert names <= set(dir(ltpost.strategies))


def test_hpc_checkpoint_numbering_follows_lightning(tmp_path):
    assert next_hpc_checkpoint_path(str(tmp_path / "new")).endswith("hpc_ckpt_1.ckpt")
    (tmp_path / "hpc_ckpt_1.ckpt").touch()
    (tmp_path / "hpc_ckpt_7.ckpt").mkdir()  # a sharded checkpoint is a folder
    assert next_hpc_checkpoint_path(str(tmp_path)).endswith("hpc_ckpt_8.ckpt")


def loader(seed: int = 3, rank: int = 0, replicas: int = 1) -> ResumableDataLoader:
    dataset = TensorDataset(torch.arange(10))
    sampler = ResumableSampler(dataset, replicas, rank, shuffle=True, seed=seed)
    return ResumableDataLoader(dataset, batch_size=3, sampler=sampler)


def batches(data: ResumableDataLoader) -> list[list[int]]:
    return [b[0].tolist() for b in data]


def test_resumable_loader_continues_mid_epoch_at_the_same_batch():
    """An epoch of 10 rows in batches of 3 is 4 batches; a loader stopped after 2 resumes with batches 3 and 4."""
    full = loader()
    full.sampler.set_epoch(1)
    expected = batches(full)
    assert len(expected) == 4 and sorted(sum(expected, [])) == list(range(10))

    first = loader()
    first.sampler.set_epoch(1)
    iterator = iter(first)
    seen = [next(iterator)[0].tolist(), next(iterator)[0].tolist()]
    state = first.state_dict()
    assert state == {"batches": 2} and seen == expected[:2]

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    assert batches(resumed) == expected[2:]
    resumed.sampler.set_epoch(2)
    assert len(batches(resumed)) == 4  # the offset applies to one epoch only


def test_resumable_loader_orders_by_seed_and_epoch_not_the_global_generator():
    a, b = loader(), loader()
    a.sampler.set_epoch(0)
    b.sampler.set_epoch(0)
    torch.manual_seed(123)
    first = batches(a)
    torch.manual_seed(456)
    assert batches(b) == first
    b.sampler.set_epoch(1)
    assert batches(b) != first


def test_a_checkpoint_at_the_end_of_an_epoch_resumes_at_the_next_epoch_start():
    data = loader()
    data.load_state_dict({"batches": 4})
    assert len(batches(data)) == 4


def test_ranks_take_disjoint_shares():
    shares = [sum(batches(loader(rank=r, replicas=2)), []) for r in (0, 1)]
    assert not set(shares[0]) & set(shares[1]) and sorted(shares[0] + shares[1]) == list(range(10))


def test_weight_decay_groups_do_not_depend_on_local_shapes(tiny):
    """AdamW's groups: every Linear/Embedding weight decays, every norm weight does not (the tiny Llama has no
    biases). Sharded parameters are 1-D locally (FSDP1's flat views, ZeRO-3's partitions); flattening every
    parameter in place, as they do, must leave the groups unchanged (a shape rule put everything in no-decay)."""
    import copy

    from ltpost.optim import configure_adamw

    def groups(model):
        config = configure_adamw(
            model, learning_rate=1e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
            lr_scheduler_type="constant", warmup_steps=0, warmup_ratio=0.0, total_steps=10,
        )  # fmt: skip
        names = {id(p): n for n, p in model.named_parameters()}
        return [sorted(names[id(p)] for p in g["params"]) for g in config["optimizer"].param_groups]

    decay, no_decay = groups(tiny)
    n_layers = tiny.config.num_hidden_layers
    assert len(no_decay) == 2 * n_layers + 1 and all("norm" in n for n in no_decay)  # two per layer + final
    assert len(decay) == 7 * n_layers + 1 + (0 if tiny.config.tie_word_embeddings else 1)  # q k v o gate up down
    flat = copy.deepcopy(tiny)
    for param in flat.parameters():
        param.data = param.data.flatten()
    assert groups(flat) == [decay, no_decay]
    lora_like = copy.deepcopy(tiny)
    for name, param in lora_like.named_parameters():
        param.requires_grad_("norm" not in name)
    assert groups(lora_like) == [decay]  # no empty group (DeepSpeed would drop it under the scheduler)


GENERATION_RESTORES = r"""
import os, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from ltpost.models import load_model
from ltpost.strategies import decoder_layers, gathered_for_generation, shard_with_fsdp2

dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:" + os.environ["PORT"])
model = load_model("ltpost:tiny-llama")
units = decoder_layers(model) + [model]
shard_with_fsdp2(model, init_device_mesh("cpu", (1,)), reshard_after_forward=False)
calls = {}
for unit in units:
    original = unit.set_reshard_after_forward
    def spy(value, recurse=True, unit=unit, original=original):
        calls.setdefault(id(unit), []).append(value)
        original(value, recurse=recurse)
    unit.set_reshard_after_forward = spy
with gathered_for_generation(model):
    model(input_ids=torch.tensor([[1, 2, 3]]))
print("LAST", sorted({values[-1] for values in calls.values()}), len(calls))
dist.destroy_process_group()
"""


def test_generation_puts_back_each_units_own_reshard_setting():
    """``gathered_for_generation`` keeps every FSDP2 unit gathered for the call, then restores the setting the unit
    was sharded with: ``reshard_after_forward=False`` layers stay False (the defaults came back before)."""
    import os
    import subprocess
    import sys

    from tests.distributed import REPO, free_port

    env = {**os.environ, "PYTHONPATH": str(REPO), "PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", GENERATION_RESTORES], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = [line for line in result.stdout.splitlines() if line.startswith("LAST")]
    n_units = 1 + load_model("ltpost:tiny-llama").config.num_hidden_layers
    assert last == [f"LAST [False] {n_units}"]


def test_slurm_requeue_acts_at_the_next_check_and_refuses_a_zero_interval(tmp_path):
    """SIGUSR1 at step 1 with ``check_every_n_steps=3``: nothing happens until step 3, where ``hpc_ckpt_1.ckpt``
    is written and the run stops (no SLURM job here, so no requeue)."""
    import os
    import signal

    import lightning as L
    from lightning.pytorch.callbacks import Callback

    with pytest.raises(ValueError, match="check_every_n_steps"):
        ltpost.SLURMRequeue(check_every_n_steps=0)

    class SignalAtStepOne(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 1:
                os.kill(os.getpid(), signal.SIGUSR1)

    requeue = ltpost.SLURMRequeue(check_every_n_steps=3)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=10, default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[SignalAtStepOne(), requeue],
    )  # fmt: skip
    trainer.fit(
        ltpost.SFTModule(learning_rate=1e-3, warmup_ratio=0.0),
        datamodule=ltpost.SFTDataModule(batch_size=2, max_train_samples=40),
    )
    assert trainer.global_step == 3
    assert requeue.checkpoint_path == str(tmp_path / "hpc_ckpt_1.ckpt") and os.path.exists(requeue.checkpoint_path)


FSDP1_ADAPTER_EXPORT = r"""
import os, torch, torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from ltpost.callbacks.hf_export import gathered_state_dict
from ltpost.models import load_model
from ltpost.strategies import layer_classes

dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:" + os.environ["PORT"])
base = load_model("ltpost:tiny-llama")
policy = ModuleWrapPolicy(layer_classes(base))
model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
holder = torch.nn.Module()
holder.model = model
root = FullyShardedDataParallel(holder, auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=True)
try:
    gathered_state_dict(model, root)
except NotImplementedError as error:
    print("REFUSED", error)
dist.destroy_process_group()
"""


def test_a_lora_adapter_export_under_fsdp1_is_refused_with_the_fix():
    """PEFT selects an adapter's entries by module path, which FSDP1's wrappers change: written, the adapter file
    would be empty. HFExport refuses and names the fix (FSDP2, or DDP; ``merge_lora=True`` works under FSDP1)."""
    import os
    import subprocess
    import sys

    from tests.distributed import REPO, free_port

    env = {**os.environ, "PYTHONPATH": str(REPO), "PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", FSDP1_ADAPTER_EXPORT], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED" in result.stdout and "FSDP2Strategy" in result.stdout, result.stdout[-2000:]
