"""Profile one side of ``bench/compare.py`` with ``torch.profiler``: where its training CPU time goes, by operator.

Run from the repository root (one method, one side, the benchmark's own work and settings)::

    python bench/profile_side.py --method reward --side ltpost [--steps 12] [--top 15] [--threads 1]
    python bench/profile_side.py --method reward --side trl

Only the training steps are profiled (the profiler starts at the first step and stops after the last; model
loading and data preparation stay outside). Prints the operators by self CPU time and the totals for attention
(``scaled_dot_product_attention`` and what it dispatches to), matrix multiplies and AdamW's kernels, which is what
explains a difference between two sides doing the same forwards and backwards.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sides  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

GROUPS = {
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax", "masked_fill"),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "adamw kernels": ("_foreach",),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=sides.METHODS, required=True)
    parser.add_argument("--side", default="ltpost", help="ltpost, or a TRL variant of bench/sides_trl.py")
    parser.add_argument("--steps", type=int, default=12, help="steps trained (all profiled)")
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchlib import quiet

    quiet()
    sides.STEPS[args.method] = (args.steps, 0)
    prof = profile(activities=[ProfilerActivity.CPU])
    started = {"on": False}
    begin, end = sides.Recorder.begin, sides.Recorder.end

    def begin_profiled(self):  # the first step starts the profiler; every step's window is what the tables show
        if not started["on"]:
            started["on"] = True
            prof.__enter__()
        begin(self)

    def end_profiled(self, loss=None):
        end(self, loss)
        if len(self.step_s["cpu"]) == args.steps:
            prof.__exit__(None, None, None)

    sides.Recorder.begin, sides.Recorder.end = begin_profiled, end_profiled
    with tempfile.TemporaryDirectory(prefix="ltpost-profile-") as log_dir:
        if args.side == "ltpost":
            run = sides.ltpost_solo(args.method, args.steps, 0, args.threads, log_dir)
        else:
            import sides_trl

            run = sides_trl.run(args.method, args.side, False, args.threads)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))
    total = sum(e.self_cpu_time_total for e in events)
    median = sorted(run["step_s"]["cpu"])[args.steps // 2]
    print(
        f"{args.method} {args.side}: {args.steps} steps, median step {median:.3f} s (CPU), "
        f"profiled self CPU total {total / 1e6:.2f} s"
    )
    for group, names in GROUPS.items():
        mine = sum(e.self_cpu_time_total for e in events if any(n.lower() in e.key.lower() for n in names))
        print(f"  {group:<10} {mine / 1e6:6.2f} s  {mine / total:6.1%} of the profiled self CPU time")


if __name__ == "__main__":
    main()
