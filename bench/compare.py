"""ltpost against the floor (a raw PyTorch loop) and against TRL, on identical work, for every stable method.

Run from the repository root (CPU, about 20 minutes; ``--quick`` checks in about a minute that it runs)::

    pip install -e ".[bench]"        # TRL, for the benchmark only (ltpost never imports it); without it: no TRL rows
    python bench/compare.py [--methods sft,dpo,reward,grpo,rloo] [--rounds 2] [--threads 1] [--quick]
                            [--output bench/results/compare.json]

Writes the JSON (every per-step number, the settings, the machine) and, beside it, the markdown table
(``compare.md``), and prints the table.

The work (``bench/sides.py``, from the per-method benchmarks' constants): the tiny Llama ``ltpost:tiny-llama``
(fp32), ltpost's tokenizer, the built-in arithmetic tasks, 16 rows / pairs / prompts per step (GRPO and RLOO: x 8
generations of at most 8 tokens), AdamW with the shipped configs' learning rates and schedules, no clipping, one
torch thread, CPU.

The sides, per method:

- ``raw``: a plain PyTorch loop doing exactly ltpost's forwards, losses, backward and optimizer steps, on the same
  batches (padding-free), run in lockstep with ltpost in one process by the per-method benchmark
  (``sft_step.py``, ``preference_step.py``, ``online_step.py``), losses checked bit for bit (DPO / reward: to 1e-5,
  as that script checks). ``ltpost / raw`` is the median of per-step CPU-time ratios.
- ``ltpost``: ``Trainer.fit`` with the method's module and datamodule and ltpost's defaults (padding-free batches,
  DPO reference log-probs precomputed, GRPO/RLOO prompts shared in packed rows and no old-log-prob forward), alone
  in the same process before the lockstep pair (so the process's peak RSS is ltpost's alone).
- ``trl`` (its defaults, gradient checkpointing included) and ``trl-matched``, the TRL settings closest to ltpost's
  defaults (gradient checkpointing off, SFT ``padding_free=True``, DPO ``precompute_ref_log_probs=True``), each in
  a process of its own (``sides_trl.py`` documents the configuration).

Measured per side: seconds per optimizer step (median of the measured steps, after the warm-up steps, wall and CPU
time of the process); tokens per second = non-padding tokens of the step's sequences / step time (offline methods:
the tokens the training forwards received, counted by a forward hook from the batches each side's collator made:
equal on all sides; GRPO/RLOO: prompt + completion tokens of every completion, since ltpost feeds each prompt once
per group and TRL once per completion: the same logical work); for GRPO/RLOO generated tokens per second of
generation time and the split of the step into generation (the ``generate`` call), scoring (decoding, reward
functions and, in TRL, advantages and any forwards it makes before the loss) and training (the rest); peak memory =
the process's peak resident set size (``ru_maxrss``), and its growth over the RSS right before the model is built
(imports and data excluded: TRL's process imports more).

Noise: every process runs one method's side; the processes of a method run back to back, in alternating order
from round to round, so the machine's load changes touch all sides alike; ratios are computed within a round and
their median over rounds is reported. CPU time is the headline clock (it stops while other processes hold the
core). In ``--quick`` mode one process runs every method and side (2 steps, 4 rows / pairs / prompts x 4
generations): a smoke test only, its memory figures meaningless.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import sides  # noqa: E402
from sides import METHODS, ONLINE, steps_for  # noqa: E402

DEFAULT_OUTPUT = HERE / "results" / "compare.json"
TARGET_RAW = 1.05  # ltpost / raw step time, at most
TARGET_TRL = {"sft": 1.3, "dpo": 1.2, "reward": 1.2, "grpo": 1.2, "rloo": 1.2}  # ltpost / TRL tokens/s, at least


def trl_variants(method: str) -> tuple[str, ...]:
    from sides_trl import VARIANTS

    return VARIANTS[method]


def have_trl() -> bool:
    return importlib.util.find_spec("trl") is not None


# -- worker processes -----------------------------------------------------------------------------------------


def worker_main(args: argparse.Namespace) -> None:
    import torch
    from benchlib import quiet

    torch.set_num_threads(args.threads)
    quiet()
    sides.configure(args.quick)
    results = []
    for job in args.jobs.split(","):
        method, side = job.split(":")
        if side == "ltpost":
            results.append(sides.worker(method, args.quick, args.threads))
        else:
            import sides_trl

            results.append({side: sides_trl.run(method, side, args.quick, args.threads)})
    Path(args.result).write_text(json.dumps(results))


def run_worker(jobs: list[str], args: argparse.Namespace, env: dict) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result = handle.name
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--jobs", ",".join(jobs)]
    command += ["--threads", str(args.threads), "--result", result] + (["--quick"] if args.quick else [])
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-8000:])
        raise RuntimeError(f"worker {jobs} failed with exit status {completed.returncode}")
    print(f"  {','.join(jobs)}: {time.perf_counter() - started:.0f} s", flush=True)
    out = json.loads(Path(result).read_text())
    os.unlink(result)
    return out


# -- summary --------------------------------------------------------------------------------------------------


def median_after(values: list[float], warmup: int) -> float:
    return statistics.median(values[warmup:])


def rate(numerator: list[float], seconds: list[float], warmup: int) -> float:
    """Total over the measured steps / their total time (the occasional slow step counts)."""
    return sum(numerator[warmup:]) / sum(seconds[warmup:])


def side_metrics(run: dict, warmup: int, clock: str) -> dict:
    step = run["step_s"][clock]
    out = {
        "step_s": median_after(step, warmup),
        "tokens_per_s": rate(run["sequence_tokens"], step, warmup),
        "fed_tokens_per_s": rate(run["fed_tokens"], step, warmup),
        "tokens_per_step": statistics.mean(run["sequence_tokens"][warmup:]),
        "fed_tokens_per_step": statistics.mean(run["fed_tokens"][warmup:]),
    }
    if run["method"] in ONLINE:
        generation, scoring = run["generation_s"][clock], run["scoring_s"][clock]
        total = sum(step[warmup:])
        out["generated_tokens_per_s"] = rate(run["generated_tokens"], generation, warmup)
        out["generated_tokens_per_step"] = statistics.mean(run["generated_tokens"][warmup:])
        out["generation_share"] = sum(generation[warmup:]) / total
        out["scoring_share"] = sum(scoring[warmup:]) / total
        out["training_share"] = 1 - out["generation_share"] - out["scoring_share"]
    return out


def summarize(method: str, rounds: list[dict], warmup: int) -> dict:
    """``rounds``: per round, ``{side: run}`` plus ``lockstep``. Medians over rounds of per-round figures."""
    sides = [name for name in rounds[0] if name != "lockstep"]
    summary = {"sides": {}, "ratios": {}}
    for name in sides:
        entry = {"settings": rounds[0][name]["settings"]}
        for clock in ("wall", "cpu"):
            per_round = [side_metrics(r[name], warmup, clock) for r in rounds]
            entry[clock] = {key: statistics.median(m[key] for m in per_round) for key in per_round[0]}
        entry["peak_rss_mib"] = statistics.median(r[name]["peak_rss_mib"] for r in rounds)
        entry["peak_rss_growth_mib"] = statistics.median(
            r[name]["peak_rss_mib"] - r[name]["rss_before_mib"] for r in rounds
        )
        entry["initial_weights"] = rounds[0][name]["initial_weights"]
        entry["first_loss"] = rounds[0][name]["losses"][0] if rounds[0][name]["losses"] else None
        summary["sides"][name] = entry
    lock = [r["lockstep"] for r in rounds]
    raw = {}
    for clock in ("wall", "cpu"):
        raw[clock] = {"step_s": statistics.median(median_after(p["raw_step_s"][clock], warmup) for p in lock)}
        if "tokens_per_step" in lock[0]:
            raw[clock]["tokens_per_s"] = statistics.median(
                rate(p["tokens_per_step"], p["raw_step_s"][clock], warmup) for p in lock
            )
    summary["raw"] = raw
    summary["ratios"]["ltpost_over_raw_paired_cpu"] = statistics.median(p["ratio_paired_cpu"] for p in lock)
    summary["ratios"]["ltpost_over_raw_paired_cpu_per_round"] = [p["ratio_paired_cpu"] for p in lock]
    summary["ratios"]["ltpost_over_raw_paired_wall"] = statistics.median(p["ratio_paired_wall"] for p in lock)
    if method in ONLINE:
        summary["ratios"]["ltpost_over_raw_outside_generation_cpu"] = statistics.median(
            p["outside_generation_ratio_paired_cpu"] for p in lock
        )
    summary["lockstep_losses_bitwise_equal"] = all(p["losses_bitwise_equal"] for p in lock)
    summary["lockstep_max_abs_loss_diff"] = max(p["max_abs_loss_diff"] for p in lock)
    summary["same_initial_weights"] = len({e["initial_weights"] for e in summary["sides"].values()}) == 1
    for name in sides:
        if name == "ltpost":
            continue
        per_round = [
            side_metrics(r["ltpost"], warmup, "cpu")["tokens_per_s"]
            / side_metrics(r[name], warmup, "cpu")["tokens_per_s"]
            for r in rounds
        ]
        summary["ratios"][f"ltpost_over_{name}_tokens_per_s_cpu"] = statistics.median(per_round)
        summary["ratios"][f"ltpost_over_{name}_tokens_per_s_cpu_per_round"] = per_round
        summary["ratios"][f"ltpost_over_{name}_peak_rss"] = (
            summary["sides"]["ltpost"]["peak_rss_mib"] / summary["sides"][name]["peak_rss_mib"]
        )
        growth = summary["sides"][name]["peak_rss_growth_mib"]  # 0 can happen in --quick's shared process
        summary["ratios"][f"ltpost_over_{name}_peak_rss_growth"] = (
            summary["sides"]["ltpost"]["peak_rss_growth_mib"] / growth if growth > 0 else float("nan")
        )
    return summary


def targets(summaries: dict) -> dict:
    out = {}
    for method, s in summaries.items():
        r = s["ratios"]
        entry = {
            "ltpost_over_raw": r["ltpost_over_raw_paired_cpu"],
            "raw_met": r["ltpost_over_raw_paired_cpu"] <= TARGET_RAW,
        }
        if "trl" in s["sides"]:
            entry["ltpost_over_trl_tokens_per_s"] = r["ltpost_over_trl_tokens_per_s_cpu"]
            entry["trl_target"] = TARGET_TRL[method]
            entry["trl_met"] = r["ltpost_over_trl_tokens_per_s_cpu"] >= TARGET_TRL[method]
            entry["memory_met"] = s["sides"]["ltpost"]["peak_rss_mib"] <= s["sides"]["trl"]["peak_rss_mib"]
        out[method] = entry
    return out


def markdown(summaries: dict, env: dict, quick: bool) -> str:
    lines = [
        f"Machine: {env['cpu_model']}, {env['cpu_count']} cores, {env['torch_threads']} torch thread; torch "
        f"{env['torch']}, transformers {env['transformers']}, Lightning {env['lightning']}, TRL {env['trl']}; "
        f"load average {env['load_average_at_start']:.2f} at start, {env['load_average_at_end']:.2f} at end"
        + (" (--quick: a smoke test, not a measurement)" if quick else ""),
        "",
        "| method | side | s/step (CPU) | tokens/s | gen tokens/s | gen / score / train | peak RSS MiB (growth) "
        "| ltpost vs this |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for method, s in summaries.items():
        raw = s["raw"]["cpu"]
        tokens = f"{raw['tokens_per_s']:.0f}" if "tokens_per_s" in raw else "—"
        r = s["ratios"]
        vs_raw = f"ltpost/raw step time **{r['ltpost_over_raw_paired_cpu']:.3f}** (paired)"
        if method in ONLINE:
            vs_raw += f", outside generation {r['ltpost_over_raw_outside_generation_cpu']:.3f}"
        lines.append(f"| {method} | raw loop (lockstep) | {raw['step_s']:.3f} | {tokens} | | | — | {vs_raw} |")
        for name, side in s["sides"].items():
            m = side["cpu"]
            gen = f"{m['generated_tokens_per_s']:.0f}" if "generated_tokens_per_s" in m else ""
            split = (
                f"{m['generation_share']:.0%} / {m['scoring_share']:.0%} / {m['training_share']:.0%}"
                if "generation_share" in m
                else ""
            )
            vs = (
                ""
                if name == "ltpost"
                else f"tokens/s **{r[f'ltpost_over_{name}_tokens_per_s_cpu']:.2f}x**, "
                f"peak RSS {r[f'ltpost_over_{name}_peak_rss']:.2f}x"
            )
            label = "ltpost (defaults)" if name == "ltpost" else f"{name}: {side['settings']}"
            lines.append(
                f"| {method} | {label} | {m['step_s']:.3f} | {m['tokens_per_s']:.0f} | {gen} | {split} "
                f"| {side['peak_rss_mib']:.0f} ({side['peak_rss_growth_mib']:.0f}) | {vs} |"
            )
    t = targets(summaries)
    lines += [
        "",
        "| method | ltpost / raw (<= 1.05) | ltpost / TRL tokens/s (target) | peak RSS <= TRL's |",
        "|---|---|---|---|",
    ]
    for method, e in t.items():
        trl = (
            f"{e['ltpost_over_trl_tokens_per_s']:.2f} (>= {e['trl_target']}) {'met' if e['trl_met'] else 'MISSED'}"
            if "trl_met" in e
            else "TRL not installed"
        )
        mem = ("met" if e["memory_met"] else "MISSED") if "memory_met" in e else "—"
        lines.append(f"| {method} | {e['ltpost_over_raw']:.3f} {'met' if e['raw_met'] else 'MISSED'} | {trl} | {mem} |")
    return "\n".join(lines)


def environment(threads: int) -> dict:
    """The machine and the versions (read from the installed metadata: this process imports none of them)."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        **{name: installed(name) for name in ("torch", "transformers", "lightning", "trl", "accelerate")},
        "load_average_at_start": os.getloadavg()[0],
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all methods and sides")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (and OMP_NUM_THREADS)")
    parser.add_argument("--quick", action="store_true", help="smoke test: one round, 2 small steps, one process")
    parser.add_argument("--output", type=Path, default=None, help=f"the JSON file (default {DEFAULT_OUTPUT})")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.worker:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = set(args.methods) - set(METHODS)
        if unknown or not args.methods:
            parser.error(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
        if args.quick:
            args.rounds = 1
        if args.output is None:
            args.output = DEFAULT_OUTPUT
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return {}
    with_trl = have_trl()
    if not with_trl:
        if os.environ.get("LTPOST_REQUIRE_TRL") == "1":
            raise SystemExit("LTPOST_REQUIRE_TRL=1 but TRL is not installed: pip install -e '.[bench]'")
        print("TRL is not installed (pip install -e '.[bench]'): running ltpost and the raw loop only")
    started = time.perf_counter()
    sides.configure(args.quick)
    env = environment(args.threads)
    with tempfile.TemporaryDirectory(prefix="ltpost-compare-cache-") as cache:
        worker_env = {
            **os.environ,
            "OMP_NUM_THREADS": str(args.threads),
            "MKL_NUM_THREADS": str(args.threads),
            "TOKENIZERS_PARALLELISM": "false",
            # One fresh cache for every process of the run: the built-in model is materialized once, from the
            # current code, and every side loads that very folder.
            "LTPOST_CACHE": cache,
        }
        jobs = {m: [f"{m}:ltpost"] + ([f"{m}:{v}" for v in trl_variants(m)] if with_trl else []) for m in args.methods}
        collected = {m: [] for m in args.methods}
        if args.quick:  # one process for everything (its peak RSS is shared): the smoke test stays short
            flat = [job for m in args.methods for job in jobs[m]]
            results = iter(run_worker(flat, args, worker_env))
            for m in args.methods:
                merged = {}
                for _ in jobs[m]:
                    merged.update(next(results))
                collected[m].append(merged)
        else:
            for r in range(args.rounds):
                print(f"round {r}", flush=True)
                for i, m in enumerate(args.methods):
                    order = jobs[m] if (r + i) % 2 == 0 else jobs[m][::-1]  # alternate who goes first
                    merged = {}
                    for job in order:
                        merged.update(run_worker([job], args, worker_env)[0])
                    collected[m].append(merged)
    env["load_average_at_end"] = os.getloadavg()[0]
    env["total_s"] = time.perf_counter() - started
    summaries = {m: summarize(m, collected[m], steps_for(m, args.quick)[1]) for m in args.methods}
    table = markdown(summaries, env, args.quick)
    print()
    print(table)
    result = {
        "config": {
            "methods": args.methods,
            "rounds": args.rounds,
            "threads": args.threads,
            "quick": args.quick,
            "steps_warmup": {m: steps_for(m, args.quick) for m in args.methods},
            "batch_size": sides.BATCH_SIZE,  # rows (SFT), pairs (DPO, reward) or prompts (GRPO, RLOO) per step
            "num_generations": sides.NUM_GENERATIONS,
            "max_completion_length": sides.MAX_COMPLETION_LENGTH,
            "command": "python bench/compare.py " + " ".join(sys.argv[1:] if argv is None else argv),
        },
        "env": env,
        "targets": targets(summaries),
        "summary": summaries,
        "runs": collected,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    args.output.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {args.output} and {args.output.with_suffix('.md')}; total {env['total_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
