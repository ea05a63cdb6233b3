"""The run report: ``python -m ltpost.doctor LOG_DIR [--json] [--png PATH]``.

Reads a finished or running run's TensorBoard events and the ``health.jsonl`` the ``TrainingHealth`` callback
wrote, and prints a short verdict per area (progress, RL signal, stability, ...) with the evidence, and the
findings in order. ``--json`` prints the same as one JSON document for programs. A PNG with the key curves and the
findings marked on them is written beside the events (``doctor.png``, or ``--png PATH``; ``--no-png`` skips it).

A run without ``health.jsonl`` (the callback was off) is diagnosed by replaying its logged curves through the same
checks (``ltpost.health``), so the report works on any run that logged TRL's metric names.

``LOG_DIR`` is a run folder (``lightning_logs/version_3``) or a folder of runs (``lightning_logs``: the most
recent one is read).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from ltpost.health import AREAS, HealthMonitor, RunInfo

# Which curves speak for each area (the first present is the headline), and the panels of the PNG.
AREA_METRICS = {
    "progress": ["train/reward", "train/loss", "eval/reward", "eval/loss", "eval/rewards/accuracies"],
    "rl-signal": ["train/frac_reward_zero_std", "train/reward_std"],
    "exploration": ["train/entropy"],
    "generation": ["train/completions/clipped_ratio", "train/completions/mean_length"],
    "reward-hacking": ["train/completions/mean_length", "train/reward"],
    "preference": ["train/rewards/accuracies", "train/rewards/margins", "train/logps/chosen"],
    "optimization": ["train/clip_ratio/region_mean", "train/grad_norm"],
    "stability": ["train/grad_norm", "train/kl", "train/loss"],
    "generalization": ["eval/loss", "eval/reward"],
    "throughput": ["timing/step_s", "train/padding_fraction", "train/timing/generation_s", "timing/data_wait_s"],
}
PANELS = [
    "train/loss",
    "train/reward",
    "eval/reward",
    "eval/loss",
    "train/rewards/margins",
    "train/logps/chosen",
    "train/kl",
    "train/entropy",
    "train/grad_norm",
    "train/completions/mean_length",
]


def find_run(path: str | Path) -> Path:
    """The run folder: ``path`` itself when it holds event files, else its most recently written sub-folder that
    does."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run folder such as lightning_logs/version_0.")
    if any(path.glob("events.out.tfevents.*")):
        return path
    runs = [p.parent for p in path.rglob("events.out.tfevents.*")]
    if not runs:
        raise FileNotFoundError(
            f"No TensorBoard event files under {path}. Was the run logged with a TensorBoardLogger (the CLI's default)?"
        )
    return max(runs, key=lambda p: max(f.stat().st_mtime for f in p.glob("events.out.tfevents.*")))


def read_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of the run: ``tag -> [(step, value), ...]`` in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def read_findings(run: Path) -> list[dict[str, Any]] | None:
    path = run / "health.jsonl"
    if not path.exists():
        return None
    with open(path) as stream:
        return [json.loads(line) for line in stream if line.strip()]


def saved_config(run: Path) -> dict[str, Any]:
    """The CLI's saved config of the run (``config.yaml`` beside the events), or {} when it was run from Python."""
    config = run / "config.yaml"
    if not config.exists():
        return {}
    import yaml

    return yaml.safe_load(config.read_text()) or {}


def model_name(run: Path) -> str | None:
    """The module's class from the CLI's saved config, when there is one."""
    model = saved_config(run).get("model")
    return model.get("class_path") if isinstance(model, dict) else None


def replay(scalars: dict[str, list[tuple[int, float]]], config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The findings the checks raise over the logged curves, step by step (for runs without ``health.jsonl``).

    What the callback reads from the trainer comes from the saved config when there is one (gradient clipping, the
    planned steps, the module's settings) and the learning rate from ``LearningRateMonitor``'s curve (``lr-*``)."""
    config = config or {}
    trainer = config.get("trainer") or {}
    model = config.get("model") or {}
    settings = model.get("init_args") or {} if isinstance(model, dict) else {}
    by_step: dict[int, dict[str, float]] = {}
    for tag, points in scalars.items():
        name = "lr" if tag.startswith("lr-") else tag
        for step, value in points:
            by_step.setdefault(step, {})[name] = value
    last = max(by_step) if by_step else 0
    max_steps = trainer.get("max_steps") if (trainer.get("max_steps") or -1) > 0 else last
    monitor = HealthMonitor()
    records = []
    peak_lr = 0.0
    for step in sorted(by_step):
        lr = by_step[step].get("lr")
        if lr is not None:
            peak_lr = max(peak_lr, lr)
        info = RunInfo(
            step=step,
            max_steps=max_steps,
            lr_ratio=lr / peak_lr if lr is not None and peak_lr > 0 else 1.0,
            gradient_clip_val=trainer.get("gradient_clip_val") or None,
            settings=settings,
        )
        for event in monitor.update(step, by_step[step], info):
            records.append(event.record())
    return records


def _first_last(points: list[tuple[int, float]]) -> str:
    first, last = points[0][1], points[-1][1]
    return f"{first:.4g} -> {last:.4g} (steps {points[0][0]}-{points[-1][0]})"


def diagnose(log_dir: str | Path) -> dict[str, Any]:
    """The report as a dict: the run, a verdict per area with evidence, and the findings in order."""
    run = find_run(log_dir)
    scalars = read_scalars(run)
    findings = read_findings(run)
    source = "health.jsonl"
    if findings is None:
        findings, source = replay(scalars, saved_config(run)), "replayed from the logged curves, no health.jsonl"
    steps = max((points[-1][0] for points in scalars.values() if points), default=0)
    open_findings: dict[str, dict[str, Any]] = {}
    for record in findings:
        if record["status"] == "raised":
            open_findings[record["code"]] = record
        else:
            open_findings.pop(record["code"], None)
    areas = {}
    for area, title in AREAS.items():
        metrics = [name for name in AREA_METRICS.get(area, []) if scalars.get(name)]
        raised = [r for r in findings if r["area"] == area and r["status"] == "raised"]
        if not metrics and not raised:
            continue  # nothing this run logged speaks to this area
        still = [r for r in raised if open_findings.get(r["code"]) is r]
        status = (
            ("critical" if any(r["severity"] == "critical" for r in still) else "problem")
            if still
            else ("recovered" if raised else "ok")
        )
        areas[area] = {
            "title": title,
            "status": status,
            "evidence": {name: _first_last(scalars[name]) for name in metrics},
            "findings": [f"{r['code']} at step {r['step']}" for r in raised],
        }
    return {
        "run": str(run),
        "model": model_name(run),
        "last_step": steps,
        "findings_source": source,
        "areas": areas,
        "findings": findings,
        "open": sorted(open_findings),
    }


def render_text(report: dict[str, Any]) -> str:
    lines = [
        f"ltpost doctor: {report['run']}"
        + (f" ({report['model']})" if report["model"] else "")
        + f", last step {report['last_step']}, {sum(r['status'] == 'raised' for r in report['findings'])} findings "
        f"({report['findings_source']})",
        "",
    ]
    for area in report["areas"].values():
        evidence = "; ".join(f"{name} {text}" for name, text in area["evidence"].items()) or "no curves"
        line = f"  {area['title']:<20} {area['status'].upper():<10} {evidence}"
        if area["findings"]:
            line += f"  [{', '.join(area['findings'])}]"
        lines.append(line)
    if report["findings"]:
        lines += ["", "Findings:"]
        for record in report["findings"]:
            if record["status"] == "raised":
                lines.append(
                    f"  step {record['step']:>6}  {record['severity'].upper()} {record['code']}: {record['message']}. "
                    f"{record['action']}"
                )
            else:
                lines.append(f"  step {record['step']:>6}  RECOVERED {record['code']}")
    else:
        lines += ["", "No findings: nothing the checks watch for happened in this run."]
    return "\n".join(lines)


def render_png(report: dict[str, Any], scalars: dict[str, list[tuple[int, float]]], path: str | Path) -> Path:
    """The key curves, one panel each, with each finding marked on the curves of its area: a red dashed line and
    its code where it was raised, a green dotted line where it recovered. The curve behind each finding (e.g.
    ``train/frac_reward_zero_std`` for ``reward-std-collapse``) gets a panel of its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in PANELS if scalars.get(name)]
    for record in report["findings"]:  # the curve that speaks for each finding's area, if not shown yet
        headline = next((m for m in AREA_METRICS.get(record["area"], []) if scalars.get(m)), None)
        if headline and headline not in panels:
            panels.append(headline)
    panels = panels[:10] or sorted(scalars)[:4]
    columns = 2
    rows = max(1, math.ceil(len(panels) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(12, 3.2 * rows), squeeze=False)
    for axis, name in zip(axes.flat, panels):
        steps, values = zip(*scalars[name])
        axis.plot(steps, values, lw=1.2, marker="o" if len(steps) < 30 else None, ms=3)
        axis.set_title(name, fontsize=10)
        axis.grid(alpha=0.3)
        relevant = [r for r in report["findings"] if name in AREA_METRICS.get(r["area"], [])]
        for i, record in enumerate(r for r in relevant if r["status"] == "raised"):
            axis.axvline(record["step"], color="tab:red", ls="--", lw=1)
            axis.annotate(
                record["code"],
                xy=(record["step"], 0.95 - 0.14 * (i % 5)),
                xycoords=("data", "axes fraction"),
                fontsize=8,
                color="tab:red",
                va="top",
                ha="left",
                xytext=(3, 0),
                textcoords="offset points",
            )
        for record in relevant:
            if record["status"] == "recovered":
                axis.axvline(record["step"], color="tab:green", ls=":", lw=1.2)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    open_codes = ", ".join(report["open"]) or "none"
    figure.suptitle(f"{report['run']}\nopen findings: {open_codes}", fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ltpost.doctor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("log_dir", help="a run folder (lightning_logs/version_0) or a folder of runs")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--png", default=None, help="where to write the PNG (default: <run>/doctor.png)")
    parser.add_argument("--no-png", action="store_true", help="do not write the PNG")
    args = parser.parse_args(argv)
    try:
        report = diagnose(args.log_dir)
    except FileNotFoundError as error:
        print(f"ltpost doctor: {error}", file=sys.stderr)
        return 2
    if not args.no_png:
        scalars = read_scalars(Path(report["run"]))
        report["png"] = str(render_png(report, scalars, args.png or os.path.join(report["run"], "doctor.png")))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_text(report))
        if report.get("png"):
            print(f"\ncurves: {report['png']}")
    return 1 if any(area["status"] == "critical" for area in report["areas"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
