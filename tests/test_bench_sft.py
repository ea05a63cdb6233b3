"""bench/sft_step.py keeps running: its --quick mode finishes and writes complete, sane JSON.

Speed is never asserted here (machines differ and are shared); only that every timing exists and is positive.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("raw", "ltpost", "ltpost+tensorboard", "raw-padded", "ltpost-padded")


def positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@pytest.mark.slow
def test_sft_step_bench_quick(tmp_path):
    output = tmp_path / "x.json"
    completed = subprocess.run(
        [sys.executable, "bench/sft_step.py", "--quick", "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "| variant |" in completed.stdout  # the markdown table is printed

    result = json.loads(output.read_text())
    assert {"config", "env", "checks", "summary", "runs"} <= set(result)
    assert result["config"]["quick"] is True
    assert result["env"]["torch_threads"] == 1

    # Both loops saw the same batches and computed the same losses, in both padding modes.
    for mode in ("padding_free", "padded"):
        assert result["checks"][mode]["identical_batches"] is True
        assert result["checks"][mode]["max_abs_loss_diff"] <= 1e-4

    summary = result["summary"]
    assert set(summary) == set(VARIANTS)
    for name, entry in summary.items():
        assert 0.0 <= entry["padding_fraction"] < 1.0, name
        for clock in ("wall", "cpu"):
            timings = entry[clock]
            for key in ("step_s", "iter_s", "fit_s_per_step", "tokens_per_s"):
                assert positive(timings[key]), (name, clock, key, timings[key])
            if entry.get("baseline"):
                for key in ("ratio_step", "ratio_iter", "ratio_fit"):
                    assert positive(timings[key]), (name, clock, key, timings[key])
    assert summary["ltpost"]["padding_fraction"] == 0.0  # padding-free batches hold no padding at all

    assert {run["variant"] for run in result["runs"]} == set(VARIANTS)
    steps = result["config"]["steps"]
    for run in result["runs"]:
        for clock in ("wall", "cpu"):
            assert len(run["step_s"][clock]) == steps
            assert len(run["iter_s"][clock]) == steps - 1
            assert all(positive(t) for t in run["step_s"][clock] + run["iter_s"][clock])
            assert positive(run["fit_s"][clock])
        assert len(run["losses"]) == steps and all(math.isfinite(loss) for loss in run["losses"])
