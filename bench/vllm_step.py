"""Benchmark a GRPO step with the vLLM engine (colocate, in process) against the Hugging Face engine, same work.

Run from the repository root (CPU, a few minutes; ``--quick`` checks in about a minute that it runs)::

    python bench/vllm_step.py [--steps 12] [--warmup 2] [--rounds 3] [--batch-size 16] [--num-generations 16]
                              [--max-completion-length 8] [--output bench/results/vllm_step.json]

A full run writes ``bench/results/vllm_step.json`` unless ``--output`` says otherwise; ``--quick`` writes only where
``--output`` points.

What is compared
----------------
Two Lightning runs of ``ltpost.GRPOModule`` with the settings of configs/grpo.yaml and configs/grpo-vllm.yaml
(``ltpost:tiny-llama-sft``, 16 prompts x 16 generations, ``max_completion_length`` 8, temperature 1, dapo, learning
rate 1e-4, ``packing_row_tokens`` 512), on the same prompts in the same order (one ``PromptDataModule``, seeded):

- ``hf``: the default engine, ``HFRolloutEngine`` (``generate`` on the policy itself, prompts prefilled once);
- ``vllm``: ``use_vllm: true``, a ``VLLMColocateEngine`` in this process (float32, 64 MiB KV cache) and the
  ``VLLMSync`` callback pushing the policy's weights into it after every optimizer step.

The engines sample with different random streams, so completions are not identical; the work is the same in
kind and size (prompts, group size, length cap), and the script records the completion tokens per step of each run
so a difference in work is visible. Both start from the same checkpoint and the loss is the same function.

What is measured (seconds, wall and CPU clocks of the process, medians over measured steps):

- ``iter``: step start to next step start, everything the step costs, the push into vLLM included (VLLMSync runs in
  ``on_train_batch_end``, after the step's optimizer step);
- ``generation``: ``rollout_engine.generate`` (sampling and the sampled tokens' log-probs);
- ``sync``: ``VLLMSync.push`` (gathering, merging LoRA when present, handing the tensors over, the engine's reload
  and prefix-cache reset); its share of ``iter`` is ``sync_share``;
- ``engine_start_s``: starting the vLLM engine (once per run: writing the model folder, ``vllm.LLM``).

Runs alternate ``hf, vllm, hf, vllm ...`` for ``--rounds`` rounds so both see the same machine drift; the first
``--warmup`` steps of every run are left out. One torch thread by default (notes: 2-core machines).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# vLLM reads these when imported: caches to a temporary folder, warnings only.
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="ltpost-bench-vllm-cache-"))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402
from benchlib import CLOCKS, clock, common_parser, environment, parse_common, quiet, since  # noqa: E402

MODEL = "ltpost:tiny-llama-sft"
RESULT = Path(__file__).resolve().parent / "results" / "vllm_step.json"
ENGINES = ("hf", "vllm")
KV_CACHE = 64 * 2**20


def module_kwargs(args) -> dict:
    return {
        "model": args.model,
        "reward_funcs": ["ltpost.rewards.integer_accuracy"],
        "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length,
        "temperature": 1.0,
        "loss_type": "dapo",
        "beta": 0.0,
        "learning_rate": 1e-4,
        "lr_scheduler_type": "constant",
        "packing_row_tokens": 512,
    }


def run_once(engine_name: str, args, data, shared: dict) -> dict:
    """One fit of ``args.steps`` steps; returns its per-step timings."""
    from lightning.pytorch import Callback, Trainer, seed_everything

    from ltpost import GRPOModule, VLLMSync

    seed_everything(0)
    module = GRPOModule(**module_kwargs(args), use_vllm=engine_name == "vllm", vllm_kv_cache_memory_bytes=KV_CACHE)
    record = {c: {"iter": [], "generation": [], "sync": []} for c in CLOCKS}
    record["completion_tokens"] = []
    if engine_name == "vllm" and "engine" in shared:
        module.rollout_engine = shared["engine"]  # one engine for every round (VLLMSync pushes the fresh policy)

    class Timer(Callback):
        def __init__(self):
            self.start = None
            self.generation = {c: 0.0 for c in CLOCKS}
            self.sync = {c: 0.0 for c in CLOCKS}

        def on_fit_start(self, trainer, pl_module):
            if engine_name == "vllm" and "engine" not in shared:
                shared["engine"] = pl_module.rollout_engine
                shared["engine_start_s"] = pl_module.rollout_engine.start_seconds
            engine = pl_module.rollout_engine
            generate = engine.generate

            def timed_generate(*a, **k):
                start = clock()
                out = generate(*a, **k)
                for name, value in since(start).items():
                    self.generation[name] += value
                record["completion_tokens"].append(sum(len(c) for c in out.completion_ids))
                return out

            engine.generate = timed_generate
            for callback in trainer.callbacks:
                if isinstance(callback, VLLMSync):
                    push = callback.push

                    def timed_push(trainer, pl_module, push=push):
                        start = clock()
                        pushed = push(trainer, pl_module)
                        if trainer.global_step > 0:  # the push at train start belongs to no step
                            for name, value in since(start).items():
                                self.sync[name] += value
                        return pushed

                    callback.push = timed_push

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now = clock()
            if self.start is not None:
                for i, name in enumerate(CLOCKS):
                    record[name]["iter"].append(now[i] - self.start[i])
                    record[name]["generation"].append(self.generation[name])
                    record[name]["sync"].append(self.sync[name])
            self.start = now
            self.generation = {c: 0.0 for c in CLOCKS}
            self.sync = {c: 0.0 for c in CLOCKS}

    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps + 1,  # the last step only closes the previous one's interval
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=50,
        callbacks=[Timer()],
        default_root_dir=tempfile.mkdtemp(prefix="ltpost-bench-vllm-"),
    )
    start = clock()
    trainer.fit(module, datamodule=data())
    record["fit_s"] = since(start)
    if engine_name == "vllm":
        sync = next(c for c in trainer.callbacks if isinstance(c, VLLMSync))
        record["num_syncs"] = sync.num_syncs
    return record


def median_after_warmup(values: list[float], warmup: int) -> float:
    return statistics.median(values[warmup:])


def main(argv=None) -> dict:
    parser = common_parser(__doc__.split("\n")[0], steps=12, warmup=2, batch_help="prompts per step")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--num-generations", type=int, default=16)
    parser.add_argument("--max-completion-length", type=int, default=8)
    args = parse_common(parser, argv)
    torch.set_num_threads(args.threads)
    quiet()
    os.environ.setdefault("LTPOST_CACHE", tempfile.mkdtemp(prefix="ltpost-bench-cache-"))
    env = environment()
    from ltpost import PromptDataModule

    base = PromptDataModule(
        dataset="ltpost:arithmetic-prompts",
        prompts_per_step=args.batch_size,
        max_prompt_length=64,
        eval_split=None,
        max_train_samples=(args.steps + 1) * args.batch_size,
        seed=0,
    )

    def data():
        return base

    shared: dict = {}
    runs = {name: [] for name in ENGINES}
    for r in range(args.rounds):
        for name in ENGINES:
            started = time.perf_counter()
            runs[name].append(run_once(name, args, data, shared))
            print(f"round {r} {name}: {time.perf_counter() - started:.1f} s", flush=True)

    summary = {}
    for name in ENGINES:
        entry = {}
        for c in CLOCKS:
            per_step = {
                k: [v for run in runs[name] for v in run[c][k][args.warmup :]] for k in ("iter", "generation", "sync")
            }
            iter_s = statistics.median(per_step["iter"])
            entry[c] = {
                "iter_s": iter_s,
                "generation_s": statistics.median(per_step["generation"]),
                "sync_s": statistics.median(per_step["sync"]),
                "sync_share": statistics.median(s / i for s, i in zip(per_step["sync"], per_step["iter"])),
                "generation_share": statistics.median(g / i for g, i in zip(per_step["generation"], per_step["iter"])),
            }
        tokens = [t for run in runs[name] for t in run["completion_tokens"][args.warmup :]]
        entry["completion_tokens_per_step"] = statistics.mean(tokens)
        entry["measured_steps"] = sum(len(run["wall"]["iter"][args.warmup :]) for run in runs[name])
        summary[name] = entry
    ratios = {
        c: {
            "iter_vllm_over_hf": summary["vllm"][c]["iter_s"] / summary["hf"][c]["iter_s"],
            "generation_vllm_over_hf": summary["vllm"][c]["generation_s"] / summary["hf"][c]["generation_s"],
        }
        for c in CLOCKS
    }
    result = {
        "config": {**vars(args), "output": str(args.output) if args.output else None},
        "env": env,
        "engine_start_s": shared.get("engine_start_s"),
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }
    print("| engine | iter s | generation s | sync s | sync share | completion tokens/step |")
    print("|---|---|---|---|---|---|")
    for name in ENGINES:
        w = summary[name]["wall"]
        print(
            f"| {name} | {w['iter_s']:.3f} | {w['generation_s']:.3f} | {w['sync_s']:.4f} | "
            f"{w['sync_share']:.1%} | {summary[name]['completion_tokens_per_step']:.0f} |"
        )
    wall = ratios["wall"]
    print(
        f"vLLM / HF step time (wall): {wall['iter_vllm_over_hf']:.2f}; "
        f"generation {wall['generation_vllm_over_hf']:.2f}; "
        f"engine start {shared.get('engine_start_s') or 0:.1f} s"
    )
    output = args.output or (None if args.quick else RESULT)
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=1))
        print(f"wrote {output}")
    if "engine" in shared:
        shared["engine"].close()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
