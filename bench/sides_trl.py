"""The TRL side of ``bench/compare.py``: TRL's trainers on the work ``bench/sides.py`` defines.

TRL is an optional extra of the benchmark only (``pip install -e ".[bench]"``); ltpost never imports it. Nothing of
TRL is copied here: its trainers are configured, probed with a ``TrainerCallback`` and fed the same rows.

Identical work, and how it is made so:

- Model: ``ltpost.models.load_trainable_model`` on the ltpost module's own hyperparameters, right after
  ``torch.manual_seed(0)``, as the ltpost side (same folder in the same ``LTPOST_CACHE``, same random reward head);
  the initial weights' digest is recorded on both sides. fp32, CPU, the same torch thread count.
- Rows, order, batches: the very rows ltpost trains on, in its order (the per-method benchmarks' seeded
  permutation; for GRPO/RLOO the prompts of ltpost's generation rounds), read sequentially (no reshuffle), the
  same number per step. SFT, DPO and reward get ltpost's tokenized rows (so the tokens are identical; TRL's
  collators pad or pack them); GRPO/RLOO get the conversational prompts and TRL applies the same chat template.
- Optimizer: the AdamW and schedule ltpost builds (``ltpost.optim.adamw_from_hparams``), handed to TRL as
  ``optimizers=``; no gradient clipping on either side (``max_grad_norm=0``).
- No evaluation, checkpoints, reporting or logging (``logging_strategy="no"``, ``report_to="none"``), as the ltpost
  side runs without a logger. TRL still computes the metrics it computes every step (e.g. SFT entropy and token
  accuracy): that is its default behaviour, kept.
- GRPO/RLOO: the same reward functions (ltpost's callables follow TRL's signature), prompts x generations,
  completion length, temperature and top-p/k, loss settings; Hugging Face ``generate`` (no vLLM) on both sides.
"""

from __future__ import annotations

import tempfile

import sides
import torch
from sides import ONLINE, SEED, Recorder, peak_rss_mib, rss_mib, steps_for, weights_digest

# Per method, the TRL configurations run: ``trl``, its defaults (what a user gets), and ``trl-matched``, the one
# closest to ltpost's defaults: no gradient checkpointing (TRL's configs turn it on by default: every backward
# recomputes the forward), SFT padding-free, DPO reference log-probs precomputed.
VARIANTS = {method: ("trl", "trl-matched") for method in ("sft", "dpo", "reward", "grpo", "rloo")}
GC = "gradient checkpointing on (TRL's default)"
NO_GC = "gradient checkpointing off"
SETTINGS = {
    ("sft", "trl"): f"SFTTrainer defaults: padded batches, {GC}, entropy + token accuracy every step",
    ("sft", "trl-matched"): f"SFTTrainer padding_free=True (one packed row, position_ids), {NO_GC}",
    ("dpo", "trl"): f"DPOTrainer defaults: padded, frozen reference copy (a reference forward per step), {GC}",
    ("dpo", "trl-matched"): f"DPOTrainer precompute_ref_log_probs=True, padded (padding_free is disabled), {NO_GC}",
    ("reward", "trl"): f"RewardTrainer defaults: padded chosen + rejected batch, {GC}",
    ("reward", "trl-matched"): f"RewardTrainer, padded, {NO_GC}",
    ("grpo", "trl"): f"GRPOTrainer: HF generate, padded prompt + completion batch, loss dapo, beta 0, {GC}",
    ("grpo", "trl-matched"): f"GRPOTrainer as trl, {NO_GC}",
    ("rloo", "trl"): f"RLOOTrainer: HF generate, padded prompt + completion batch, beta 0, {GC}",
    ("rloo", "trl-matched"): f"RLOOTrainer as trl, {NO_GC}",
}


def fixed_order(n: int, steps: int) -> list[int]:
    """The row order of ``sft_step.make_data`` / ``preference_step.make_data``: seeded permutation, whole batches."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SEED)).tolist()
    return order[: steps * sides.BATCH_SIZE]


def training_arguments(
    config_class, output_dir: str, steps: int, hp, variant: str, batch_size: int | None = None, **extra
):
    return config_class(
        gradient_checkpointing=variant == "trl",  # TRL's default on; off in trl-matched, as ltpost's default
        output_dir=output_dir,
        per_device_train_batch_size=batch_size or sides.BATCH_SIZE,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=hp.learning_rate,  # informational: the optimizer and schedule are passed in
        lr_scheduler_type=hp.lr_scheduler_type,
        weight_decay=hp.weight_decay,
        max_grad_norm=0.0,  # no clipping, as the ltpost side
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=SEED,
        data_seed=SEED,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        **extra,
    )


def sequential(trainer_class):
    """``trainer_class`` reading its rows in the given order (the dataset is already in ltpost's order)."""

    class Sequential(trainer_class):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(
                train_dataset if train_dataset is not None else self.train_dataset
            )

    Sequential.__name__ = f"Sequential{trainer_class.__name__}"
    return Sequential


def build(method: str, variant: str, steps: int, warmup: int, threads: int, output_dir: str):
    """The TRL trainer for one method and variant, its model, and the rss before the model was built."""
    import datasets

    from ltpost.models import load_tokenizer, load_trainable_model
    from ltpost.optim import adamw_from_hparams

    module, datamodule = sides.ltpost_module_and_data(method, steps, warmup, threads)
    hp = module.hparams
    tokenizer = load_tokenizer(hp.model, revision=hp.model_revision, trust_remote_code=hp.trust_remote_code)
    if method in ONLINE:
        rounds = iter(datamodule.rounds(1, 1))  # ltpost's rounds (same seeded shuffle, epoch 0)
        rows = []
        for _ in range(steps):
            batch = next(rounds)
            for j, prompt in enumerate(batch["prompts"]):
                rows.append({"prompt": prompt, **{k: v[j] for k, v in batch["columns"].items()}})
    else:
        datamodule.setup("fit")
        tokenized = datamodule.train_dataset
        order = fixed_order(len(tokenized), steps)
        rows = []
        for i in order:
            row = tokenized[i]
            if method == "sft":
                ids, mask = row["input_ids"], row["completion_mask"]
                rows.append({"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]})
            elif method == "dpo":
                rows.append({k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
            else:
                rows.append(
                    {
                        "chosen_ids": row["prompt_ids"] + row["chosen_ids"],
                        "rejected_ids": row["prompt_ids"] + row["rejected_ids"],
                    }
                )
    dataset = datasets.Dataset.from_list(rows)
    base_rss = rss_mib()

    torch.manual_seed(SEED)  # as the ltpost side, right before its configure_model
    task = "sequence-classification" if method == "reward" else "causal-lm"
    model = load_trainable_model(hp, task=task)
    initial = weights_digest(model)
    optim = adamw_from_hparams(model, hp, steps)
    optimizers = (optim["optimizer"], optim["lr_scheduler"]["scheduler"])

    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        config = training_arguments(
            SFTConfig,
            output_dir,
            steps,
            hp,
            variant,
            # TRL refuses max_length with padding_free and no packing; the rows are ltpost's, already truncated.
            max_length=None if variant == "trl-matched" else datamodule.max_length,
            padding_free=variant == "trl-matched",
            packing=False,
            assistant_only_loss=False,  # the labels already carry ltpost's assistant-only mask
        )
        trainer = sequential(SFTTrainer)(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer, optimizers=optimizers
        )
    elif method == "dpo":
        from trl import DPOConfig, DPOTrainer

        class PreTokenized(DPOTrainer):
            def _prepare_dataset(self, dataset, *args, **kwargs):  # rows are ltpost's tokenized pairs already
                return dataset

        config = training_arguments(
            DPOConfig,
            output_dir,
            steps,
            hp,
            variant,
            max_length=datamodule.max_length,
            beta=hp.beta,
            loss_type=[hp.loss_type],
            precompute_ref_log_probs=variant == "trl-matched",
        )
        # TRL's default reference is a frozen copy loaded from the policy's path; the built-in model's config names no
        # architecture for TRL to load it by, so the same copy is loaded here, as ltpost's ReferenceModel(mode="copy").
        reference = None
        if variant == "trl":
            reference = load_trainable_model(hp, name=hp.model).eval().requires_grad_(False)
        trainer = sequential(PreTokenized)(
            model=model,
            ref_model=reference,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            optimizers=optimizers,
        )
    elif method == "reward":
        from trl import RewardConfig, RewardTrainer

        config = training_arguments(RewardConfig, output_dir, steps, hp, variant, max_length=datamodule.max_length)
        trainer = sequential(RewardTrainer)(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer, optimizers=optimizers
        )
    else:
        from ltpost.rollout.scoring import resolve_reward_funcs

        reward_funcs = resolve_reward_funcs(list(hp.reward_funcs))
        online = dict(
            batch_size=sides.BATCH_SIZE * sides.NUM_GENERATIONS,  # TRL counts completions per step
            num_generations=hp.num_generations,
            max_completion_length=hp.max_completion_length,
            temperature=hp.temperature,
            top_p=hp.top_p,
            min_p=hp.min_p,
            repetition_penalty=hp.repetition_penalty,
            beta=hp.beta,
            epsilon=hp.epsilon,
            num_iterations=hp.num_iterations,
            steps_per_generation=hp.steps_per_generation,
            shuffle_dataset=False,  # the rows are already in ltpost's round order
            reward_weights=hp.reward_weights,
            use_vllm=False,
        )
        if hp.top_k is not None:
            online["top_k"] = hp.top_k
        if hp.epsilon_high is not None:
            online["epsilon_high"] = hp.epsilon_high
        if method == "grpo":
            from trl import GRPOConfig, GRPOTrainer

            online.update(
                loss_type=hp.loss_type,
                scale_rewards=hp.scale_rewards,
                importance_sampling_level=hp.importance_sampling_level,
                mask_truncated_completions=hp.mask_truncated_completions,
            )
            config_class, trainer_class = GRPOConfig, GRPOTrainer
        else:
            from trl import RLOOConfig, RLOOTrainer

            online.update(normalize_advantages=hp.normalize_advantages)
            config_class, trainer_class = RLOOConfig, RLOOTrainer
        config = training_arguments(config_class, output_dir, steps, hp, variant, **online)
        trainer = trainer_class(
            model=model,
            reward_funcs=reward_funcs,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            optimizers=optimizers,
        )
    return trainer, model, base_rss, initial


def run(method: str, variant: str, quick: bool, threads: int) -> dict:
    """Train one TRL configuration, probed like the ltpost side; peak RSS read right after ``train``."""
    from transformers import TrainerCallback

    steps, warmup = steps_for(method, quick)
    recorder = Recorder()
    with tempfile.TemporaryDirectory(prefix="ltpost-compare-trl-") as output_dir:
        trainer, model, base_rss, initial = build(method, variant, steps, warmup, threads, output_dir)
        recorder.watch(model, method)
        last_loss = {}
        compute_loss = trainer.compute_loss

        def compute_loss_kept(*args, **kwargs):
            out = compute_loss(*args, **kwargs)
            last_loss["loss"] = out[0] if isinstance(out, tuple) else out
            return out

        trainer.compute_loss = compute_loss_kept
        if method in ONLINE:
            trainer._generate_single_turn = recorder.timed("generation", trainer._generate_single_turn)
            generate_and_score = trainer._generate_and_score_completions

            def scored(*args, **kwargs):
                output = generate_and_score(*args, **kwargs)
                prompt_tokens = int(output["prompt_mask"].sum())
                generated = int(output["completion_mask"].sum())
                recorder.add_rollout(prompt_tokens + generated, generated)
                return output

            trainer._generate_and_score_completions = recorder.timed("generate_and_score", scored)

        class Probe(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                torch.manual_seed(SEED + state.global_step)  # as the ltpost side (sampling differs anyway)
                recorder.begin()

            def on_step_end(self, args, state, control, **kwargs):
                recorder.end(last_loss.pop("loss", None))

        trainer.add_callback(Probe())
        trainer.train()
        peak = peak_rss_mib()
    result = recorder.result(
        side=variant,
        method=method,
        settings=SETTINGS[(method, variant)],
        rss_before_mib=base_rss,
        peak_rss_mib=peak,
        initial_weights=initial,
    )
    if method not in ONLINE:
        result["sequence_tokens"] = result["fed_tokens"]  # offline: the training forwards' tokens are the rows'
    return result
