"""Launching tests/scripts/scale_run.py in one process, under torchrun, or under srun; every launch has a timeout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "scale_run.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env() -> dict[str, str]:
    # DS_ACCELERATOR: DeepSpeed's CPU accelerator for tests/cpu_shims.py (read by DeepSpeed only).
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cpu",
    }


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (result.stdout[-3000:] + "\n" + result.stderr[-6000:]).strip()


def run_single(out: Path, *args: str, timeout: int = 300) -> None:
    """One process, one device."""
    command = [sys.executable, str(SCRIPT), str(out), *args]
    check(subprocess.run(command, env=script_env(), capture_output=True, text=True, timeout=timeout))


def run_torchrun(out: Path, *args: str, nproc: int = 2, timeout: int = 400) -> None:
    """``nproc`` processes on this machine started by torchrun (Lightning sees TorchElasticEnvironment)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
        f"--master-port={free_port()}", str(SCRIPT), str(out), f"--devices={nproc}", *args,
    ]  # fmt: skip
    check(subprocess.run(command, env=script_env(), capture_output=True, text=True, timeout=timeout))


def run_two_nodes(commands: list[list[str]], envs: list[dict[str, str]], timeout: int = 300) -> None:
    """Two launches at once, one per "node" on 127.0.0.1 (they rendezvous with each other); both must succeed.
    Whatever is still running when one fails or times out is killed."""
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command, env in zip(commands, envs)
    ]
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            check(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def load(out: Path, method: str, phase: str) -> dict:
    return json.loads((out / f"{method}-{phase}.json").read_text())


def losses(report: dict) -> list[list[float]]:
    """Per step, every rank's loss."""
    return [step["losses"] for step in report["steps"]]


def resumed_losses(out: Path, method: str) -> list[list[float]]:
    """The losses of the interrupted run up to its checkpoint, then those of the run resumed from it."""
    return losses(load(out, method, "first")) + losses(load(out, method, "resume"))
