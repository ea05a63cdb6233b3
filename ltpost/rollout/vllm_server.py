"""Start a vLLM server that ltpost's ``VLLMServerEngine`` (``vllm_mode: server``) can train against.

    python -m ltpost.rollout.vllm_server --model ltpost:tiny-llama-sft --port 8000 --kv-cache-memory-bytes 67108864

It is vLLM's OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``; the ``vllm serve`` console
script of the CPU build does not start) with the settings the trainer relies on:

- ``VLLM_SERVER_DEV_MODE=1``: the ``/collective_rpc`` and ``/reset_prefix_cache`` endpoints the weight sync uses;
- ``--worker-extension-cls ltpost.rollout.vllm_worker.WeightSyncExtension``: the in-place weight load;
- ``--logprobs-mode processed_logprobs``: log-probs of the distribution tokens are sampled from;
- ``--generation-config vllm``: no sampling defaults or stop tokens from the checkpoint behind the trainer's back;
- ``--enforce-eager`` on CPU.

A built-in name or a local folder is first written out as a Hugging Face folder from the loaded model
(``--folder``, default a temporary one), so vLLM gets the checkpoint names it expects; a hub id goes to vLLM as is.
Every argument after ``--`` is passed to vLLM unchanged (``-- --tensor-parallel-size 2``). On a GPU add
``-- --weight-transfer-config '{"backend": "nccl"}'`` for ``vllm_server_weight_transfer: nccl``.

``VLLMServerProcess`` starts and stops such a server from Python (tests, benchmarks): it waits for ``/health`` at
most ``timeout`` seconds and raises ``VLLMServerError`` with the end of the server's log if the process exits
first or never answers, so a broken server is an error in bounded time, never a hang.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ltpost.rollout.vllm import WORKER_EXTENSION, VLLMServerEngine, VLLMServerError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def prepare_model(model: str, folder: str | None, dtype: str) -> str:
    """What vLLM should load for ``model``: a folder written from it (built-in names, local paths), or the hub id."""
    from ltpost.assets import is_builtin

    if not (is_builtin(model) or os.path.exists(model)):
        return model
    from ltpost.models import load_model, load_tokenizer
    from ltpost.rollout.weights import save_engine_folder

    folder = folder or tempfile.mkdtemp(prefix="ltpost-vllm-server-model-")
    save_engine_folder(load_model(model, dtype=dtype), load_tokenizer(model), folder)
    return folder


def server_command(args: argparse.Namespace, model_path: str, extra: list[str]) -> list[str]:
    import torch

    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_path,
        "--served-model-name", args.model,
        "--host", args.host,
        "--port", str(args.port),
        "--dtype", args.dtype,
        "--logprobs-mode", "processed_logprobs",
        "--generation-config", "vllm",
        "--worker-extension-cls", WORKER_EXTENSION,
        "--seed", str(args.seed),
    ]  # fmt: skip
    if args.kv_cache_memory_bytes is not None:
        command += ["--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes)]
    elif not torch.cuda.is_available():
        command += ["--kv-cache-memory-bytes", str(256 * 2**20)]  # vLLM's CPU default asks for most of the memory
    else:
        command += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.max_model_len is not None:
        command += ["--max-model-len", str(args.max_model_len)]
    if not torch.cuda.is_available():
        command += ["--enforce-eager"]
    return command + extra


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m ltpost.rollout.vllm_server", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="hub id, local folder or built-in name (ltpost:tiny-llama-sft)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="float32", help="the engine's dtype (the policy's)")
    parser.add_argument(
        "--kv-cache-memory-bytes", type=int, default=None, help="KV cache size (default on CPU: 256 MiB)"
    )
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="GPU memory share (GPU only)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", default=None, help="where to write the model folder (default: a temporary one)")
    return parser.parse_args(argv), extra


def main(argv: list[str] | None = None) -> None:
    args, extra = parse_args(argv)
    model_path = prepare_model(args.model, args.folder, args.dtype)
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    command = server_command(args, model_path, extra)
    print("starting:", " ".join(command), flush=True)
    os.execvpe(command[0], command, env)  # the server takes this process over: its pid is ours


class VLLMServerProcess:
    """A vLLM server in a child process (its own process group), for tests and benchmarks.

    Args:
        model: what to serve (as ``--model`` above).
        port: its port (default: a free one).
        host: its address.
        log_path: where its output goes (default: a temporary file); ``log_tail`` reads the end.
        env: extra environment variables.
        **options: more launcher flags, e.g. ``kv_cache_memory_bytes=2**26`` (``--kv-cache-memory-bytes``).
    """

    def __init__(
        self,
        model: str,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: str | Path | None = None,
        env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
        **options,
    ) -> None:
        self.model = model
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(log_path or tempfile.mkstemp(prefix="ltpost-vllm-server-", suffix=".log")[1])
        self.env = env or {}
        self.extra_args = extra_args or []
        self.options = options
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "ltpost.rollout.vllm_server", "--model", self.model]
        command += ["--host", self.host, "--port", str(self.port)]
        for key, value in self.options.items():
            command += [f"--{key.replace('_', '-')}", str(value)]
        return command + (["--", *self.extra_args] if self.extra_args else [])

    def start(self, timeout: float = 180.0) -> VLLMServerProcess:
        """Start the server and wait until it answers ``/health`` (at most ``timeout`` seconds): ``launch`` then
        ``wait_until_ready``."""
        return self.launch().wait_until_ready(timeout)

    def launch(self) -> VLLMServerProcess:
        """Start the server process without waiting for it (several servers can then load side by side)."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,  # its own process group: stop() ends the server and the engine it spawns
            )
        return self

    def wait_until_ready(self, timeout: float = 180.0) -> VLLMServerProcess:
        """Wait until the launched server answers ``/health`` and names its model, at most ``timeout`` seconds.

        Raises:
            VLLMServerError: the process exited first (its exit code and the end of its log), or it did not
                answer in time (then it is stopped).
        """
        if self.process is None:
            raise VLLMServerError("VLLMServerProcess.wait_until_ready: call launch() (or start()) first.")
        deadline = time.monotonic() + timeout
        client = VLLMServerEngine(self.base_url, [0], timeout=5.0, retries=0)
        while True:
            code = self.process.poll()
            if code is not None:
                raise VLLMServerError(
                    f"vLLM server ({' '.join(self.command())}) exited with code {code} before it became ready. "
                    f"End of its log ({self.log_path}):\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stop()
                raise VLLMServerError(
                    f"vLLM server did not become ready within {timeout:.0f} s; stopped it. End of its log "
                    f"({self.log_path}):\n{self.log_tail()}"
                )
            try:  # short polls, so an exited process is noticed within about two seconds
                client.wait_until_ready(timeout=min(2.0, remaining))
                return self
            except VLLMServerError:
                continue

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to the server's process group, SIGKILL after ``timeout`` seconds; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
        try:  # children of the server (vLLM's engine process) that outlived it
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.process.returncode

    def __enter__(self) -> VLLMServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    main()
