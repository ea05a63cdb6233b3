"""The FSDP1 and DeepSpeed ZeRO-2/3 presets on CPU (2 processes, gloo, torchrun), against a DDP run of the same
methods, plus resume from their checkpoints and HFExport from under them.

``FSDP1Strategy`` runs on CPU as it is (it wraps with the root device itself). DeepSpeed needs the test-only shims
of tests/cpu_shims.py (Lightning refuses DeepSpeed without CUDA); everything else is the presets' own code.

- FSDP1 and ZeRO-2 repeat DDP's losses bit for bit (fp32, two ranks: the same two gradients added), and their
  exports, and the weights VLLMSync would push to vLLM, equal DDP's exactly.
- ZeRO-3 computes the same steps to rounding (measured: at most 2e-7 relative for SFT and DPO, 8e-6 for the
  reward model, 8e-5 of GRPO's near-zero loss; exports within 1.2e-4): its partitioned gradients are reduced in
  buckets of another order.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import load, losses, resumed_losses, run_torchrun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

METHODS = ["sft", "dpo", "reward", "grpo"]


def require_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is not None:
        return
    if os.environ.get("LTPOST_REQUIRE_DEEPSPEED") == "1":
        pytest.fail("LTPOST_REQUIRE_DEEPSPEED=1 but DeepSpeed is not installed (see .ci/run)")
    pytest.skip("DeepSpeed is not installed")


def run(tmp_path_factory, strategy: str, methods: list[str], *extra: str):
    out = tmp_path_factory.mktemp(strategy)
    run_torchrun(out, f"--strategy={strategy}", f"--methods={','.join(methods)}", *extra)
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return run(tmp_path_factory, "ddp", METHODS + ["rloo", "sft-lora"], "--export")


@pytest.fixture(scope="module")
def fsdp1(tmp_path_factory):  # with activation checkpointing: recomputation changes nothing in fp32
    return run(tmp_path_factory, "fsdp1-ac", METHODS + ["rloo", "sft-lora"], "--export")


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    require_deepspeed()
    return run(tmp_path_factory, "zero2", ["sft", "sft-lora", "dpo", "grpo"], "--export")


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    require_deepspeed()
    return run(tmp_path_factory, "zero3-ac", METHODS + ["sft-lora"], "--export")


def exported(out, method: str) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if method == "sft-lora" else "model.safetensors"
    return load_file(out / f"{method}-full-hf" / name)


def pushed(out, method: str) -> dict[str, torch.Tensor]:
    """What VLLMSync would send a vLLM engine at the end of the run (tests/scripts/scale_run.py)."""
    return load_file(out / f"{method}-full-pushed.safetensors")


def assert_same_tensors(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    for name in a:
        assert b[name].shape == a[name].shape  # gathered, not a shard or partition
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=atol)


@pytest.mark.parametrize("method", METHODS + ["rloo"])
def test_fsdp1_repeats_ddp_and_exports_the_same_weights(ddp, fsdp1, method):
    """FSDP1 (one unit per decoder layer, the LightningModule as root; activation checkpointing on): DPO's
    precompute runs before the first step, where it gathers the root's parameters itself; GRPO/RLOO generate with
    ranks kept in step; the export and the weights for vLLM gather every unit."""
    reference, sharded = load(ddp, method, "full"), load(fsdp1, method, "full")
    assert sharded["world_size"] == 2 and sharded["global_step"] == 6
    assert sharded["trainable_parameters"] == reference["trainable_parameters"]
    assert losses(sharded) == losses(reference)
    assert_same_tensors(exported(ddp, method), exported(fsdp1, method), atol=0)  # a tied head once, same name
    assert_same_tensors(pushed(ddp, method), pushed(fsdp1, method), atol=0)  # what vLLM would get


@pytest.mark.parametrize("method", ["sft", "sft-lora", "dpo", "grpo"])
def test_zero2_repeats_ddp_and_exports_the_same_weights(ddp, zero2, method):
    reference, partitioned = load(ddp, method, "full"), load(zero2, method, "full")
    assert partitioned["world_size"] == 2 and partitioned["global_step"] == 6
    assert partitioned["trainable_parameters"] == reference["trainable_parameters"]
    assert losses(partitioned) == losses(reference)
    assert_same_tensors(exported(ddp, method), exported(zero2, method), atol=0)
    assert_same_tensors(pushed(ddp, method), pushed(zero2, method), atol=0)  # LoRA: merged the same way


@pytest.mark.parametrize("method", METHODS + ["sft-lora"])
def test_zero3_tracks_ddp_and_exports_gathered_weights(ddp, zero3, method):
    """ZeRO-3 (with activation checkpointing) loads the model partitioned (transformers' own ZeRO-3 loading); the
    export and the weights for vLLM gather every partition."""
    reference, partitioned = load(ddp, method, "full"), load(zero3, method, "full")
    assert partitioned["world_size"] == 2 and partitioned["global_step"] == 6
    assert partitioned["trainable_parameters"] == reference["trainable_parameters"]
    torch.testing.assert_close(torch.tensor(losses(partitioned)), torch.tensor(losses(reference)), rtol=1e-4, atol=1e-6)
    assert_same_tensors(exported(ddp, method), exported(zero3, method), atol=1e-3)
    assert_same_tensors(pushed(ddp, method), pushed(zero3, method), atol=1e-3)


@pytest.mark.parametrize("strategy", ["fsdp1", "zero2", "zero3"])
def test_lora_trains_and_exports_merged_weights(ddp, request, strategy):
    """LoRA under each preset: the same steps as DDP (ZeRO-3: to rounding), and ``HFExport(merge_lora=True)``
    writes full weights with the adapters merged that ``from_pretrained`` loads with nothing missing, equal to the
    DDP run's merged export. On a sharded model (FSDP1, ZeRO-3) the merge happens in place on the gathered
    parameters; under ZeRO-2 (whole parameters on every rank) on a copy, as without a strategy."""
    from transformers import AutoModelForCausalLM

    out = request.getfixturevalue(strategy)
    close = {"rtol": 1e-4, "atol": 1e-6} if strategy == "zero3" else {"rtol": 0, "atol": 0}
    reference, run_ = load(ddp, "sft-lora", "full"), load(out, "sft-lora", "full")
    assert 0 < run_["trainable_parameters"] == reference["trainable_parameters"] < 200_000  # adapters only
    torch.testing.assert_close(torch.tensor(losses(run_)), torch.tensor(losses(reference)), **close)
    merged = out / "sft-lora-full-merged-hf"
    a, b = load_file(ddp / "sft-lora-full-merged-hf" / "model.safetensors"), load_file(merged / "model.safetensors")
    assert not any("lora" in name for name in b)
    assert_same_tensors(a, b, atol=1e-3 if strategy == "zero3" else 1e-6)
    _, info = AutoModelForCausalLM.from_pretrained(merged, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("strategy", ["fsdp1", "zero3"])
def test_resume_from_a_sharded_checkpoint_repeats_the_uninterrupted_run(tmp_path_factory, request, strategy):
    """Interrupted after the checkpoint of step 3, resumed from it: FSDP1 writes a folder of shards, DeepSpeed its
    own checkpoint folder; the losses of steps 4-6 are those of the uninterrupted run (bit for bit)."""
    uninterrupted = request.getfixturevalue(strategy)
    out = tmp_path_factory.mktemp(f"{strategy}-resume")
    for phase in ("first", "resume"):
        run_torchrun(out, f"--strategy={strategy}-ac", "--methods=sft,grpo", f"--phase={phase}")
    for method in ("sft", "grpo"):
        assert load(out, method, "first")["sharded_checkpoint"]
        assert resumed_losses(out, method) == losses(load(uninterrupted, method, "full"))
