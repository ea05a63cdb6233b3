"""Plumbing shared by the benchmarks in this folder (clocks, quiet logging, environment, common flags).

The benchmarks are run as scripts (``python bench/sft_step.py``), which puts this folder on ``sys.path``, so they
import this module as ``benchlib``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
import warnings
from pathlib import Path

import torch

CLOCKS = ("wall", "cpu")


def clock() -> tuple[float, float]:
    """Wall seconds and CPU seconds of this process (all its threads, so a logger's writer thread counts)."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> dict[str, float]:
    return {name: b - a for name, a, b in zip(CLOCKS, start, clock())}


def identity(batch):
    return batch


def common_parser(description: str, steps: int, warmup: int, batch_help: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes; a script adds its own before parsing with ``parse_common``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per run")
    parser.add_argument(
        "--warmup", type=int, default=warmup, help="first steps of every run left out of the statistics"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all variants")
    parser.add_argument("--batch-size", type=int, default=16, help=batch_help)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="a few steps, one round: checks that the script runs")
    parser.add_argument("--output", type=Path, help="write every timing and the summary to this JSON file")
    return parser


def parse_common(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.rounds = 4, 1, 1
    if args.steps < args.warmup + 2:
        parser.error("--steps must exceed --warmup by at least 2 (medians need measured steps and intervals)")
    return args


def quiet() -> None:
    """Silence per-run chatter (device info, tips, progress bars) so the timings stay readable."""
    import datasets
    import lightning.pytorch  # noqa: F401  (configures its loggers on import, so levels are set afterwards)
    import transformers

    for name in ("lightning.pytorch", "lightning.fabric", "ltpost"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def environment() -> dict:
    """Versions and machine facts recorded beside every result (ratios only compare within one run)."""
    import lightning
    import transformers

    print(f"torch threads: {torch.get_num_threads()}  (torch {torch.__version__}, lightning {lightning.__version__})")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0],
    }
