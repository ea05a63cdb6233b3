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
