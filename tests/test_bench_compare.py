"""bench/compare.py keeps running: its --quick mode covers every method and side and writes complete, sane JSON.

Speed is never asserted (machines differ and are shared); only that every number exists, is finite and positive,
that ltpost and the raw loop computed equal losses, and that every side started from the same weights. TRL is an
optional extra of the benchmark: without it the TRL side is skipped here, unless ``LTPOST_REQUIRE_TRL=1`` (CI),
which makes a missing TRL fail.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METHODS = ("sft", "dpo", "reward", "grpo", "rloo")
ONLINE = ("grpo", "rloo")
TRL_SIDES = ("trl", "trl-matched")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def have_trl() -> bool:
    if importlib.util.find_spec("trl") is not None:
        return True
    if os.environ.get("LTPOST_REQUIRE_TRL") == "1":
        pytest.fail("LTPOST_REQUIRE_TRL=1 but TRL is not installed (pip install -e '.[bench]')")
    return False


@pytest.mark.slow
def test_compare_bench_quick(tmp_path):
    with_trl = have_trl()
    output = tmp_path / "compare.json"
    completed = subprocess.run(
        [sys.executable, "bench/compare.py", "--quick", "--output", str(output)],
        cwd=REPO,
        check=False,  # the return code is asserted below, with the output
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "| method | side |" in completed.stdout  # the markdown table is printed
    assert (tmp_path / "compare.md").read_text().startswith("Machine:")

    result = json.loads(output.read_text())
    assert {"config", "env", "targets", "summary", "runs"} <= set(result)
    assert result["config"]["quick"] is True
    assert result["env"]["torch_threads"] == 1
    assert set(result["summary"]) == set(METHODS)
    for method in METHODS:
        summary = result["summary"][method]
        expected = {"ltpost"} | (set(TRL_SIDES) if with_trl else set())
        assert set(summary["sides"]) == expected, method
        # ltpost and the raw loop in lockstep: the same losses (bit for bit), finite, on every step.
        assert summary["lockstep_losses_bitwise_equal"] is True, method
        assert summary["lockstep_max_abs_loss_diff"] == 0.0, method
        assert summary["same_initial_weights"] is True, method  # ltpost and TRL start from the same weights
        assert positive(summary["raw"]["cpu"]["step_s"]), method
        assert positive(summary["ratios"]["ltpost_over_raw_paired_cpu"]), method
        for name, side in summary["sides"].items():
            metrics = side["cpu"]
            for key in ("step_s", "tokens_per_s", "fed_tokens_per_s", "tokens_per_step"):
                assert positive(metrics[key]), (method, name, key)
            assert positive(side["peak_rss_mib"]), (method, name)
            assert math.isfinite(side["first_loss"]), (method, name)
            if method in ONLINE:
                assert positive(metrics["generated_tokens_per_s"]), (method, name)
                shares = [metrics[f"{phase}_share"] for phase in ("generation", "scoring", "training")]
                assert all(0 <= share <= 1 for share in shares) and abs(sum(shares) - 1) < 1e-9, (method, name)
            if name != "ltpost":
                assert positive(summary["ratios"][f"ltpost_over_{name}_tokens_per_s_cpu"]), (method, name)
        if with_trl and method not in ONLINE:
            # Offline methods: TRL's collators made batches of exactly ltpost's non-padding tokens.
            tokens = {name: side["cpu"]["fed_tokens_per_step"] for name, side in summary["sides"].items()}
            assert len(set(tokens.values())) == 1, (method, tokens)
