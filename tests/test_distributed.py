"""Multi-process (DDP, gloo on CPU) runs of the preference methods; every run has a timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_script(script: str, *args: str, tmp_path: Path, timeout: int = 300) -> dict:
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "scripts" / script), *args, str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def test_dpo_ddp_precompute_gathers_the_full_reference_table(tmp_path):
    """Each rank precomputes a strided shard; after the all-gather every rank holds all 24 rows, equal to the
    initial policy's log-probs computed in one process."""
    report = run_script("ddp_dpo.py", "precompute", tmp_path=tmp_path)
    assert report["world_size"] == 2 and report["mode"] == "precompute" and report["global_step"] == 3
    assert report["table_rows"] == 24 and report["table_finite"]
    assert report["table_max_abs_diff"] < 1e-4
    assert report["loss"] == report["loss"]  # not NaN


def test_dpo_ddp_with_lora_uses_the_adapter_free_reference(tmp_path):
    report = run_script("ddp_dpo.py", "adapter", tmp_path=tmp_path)
    assert report["world_size"] == 2 and report["mode"] == "adapter" and report["global_step"] == 3
    assert 0.0 <= report["eval_accuracy"] <= 1.0 and report["loss"] == report["loss"]
