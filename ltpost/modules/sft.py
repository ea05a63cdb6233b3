"""SFTModule: supervised fine-tuning of a causal LM (full, LoRA or QLoRA), padding-free by default."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule

from ltpost.losses.sft import SFT_LOSSES, nll_loss
from ltpost.metrics import health_callbacks, is_logging_step, log_grad_norm, log_padding_fraction
from ltpost.models import Dtype, load_tokenizer, load_trainable_model
from ltpost.optim import adamw_from_hparams


class SFTModule(LightningModule):
    """Supervised fine-tuning: next-token loss on the tokens the datamodule marks (completion, assistant or all).

    Pair it with ``ltpost.SFTDataModule``. The model is built in ``configure_model()``, so sharding strategies
    see it only once it exists. Metrics use TRL's names under ``train/`` and ``eval/``: ``loss``, ``entropy``,
    ``mean_token_accuracy``, ``num_tokens`` (cumulative non-padding input tokens over all ranks). ``train/loss`` is
    the training objective (``loss_type``); ``eval/loss`` is always the held-out NLL, comparable across loss types.

    Args:
        model: hub id, local path (full checkpoint or PEFT adapter folder) or built-in name (``ltpost:tiny-llama``).
        loss_type: ``nll`` (cross-entropy) or ``dft`` (Dynamic Fine-Tuning: NLL weighted by the token's probability).
        learning_rate: peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to every weight except biases and norms.
        adam_beta1: AdamW beta1.
        adam_beta2: AdamW beta2.
        adam_epsilon: AdamW epsilon.
        lr_scheduler_type: schedule after warmup: ``linear``, ``cosine``, ``constant`` (transformers' schedulers).
        warmup_steps: optimizer steps of linear warmup; overrides ``warmup_ratio`` when > 0.
        warmup_ratio: warmup as a fraction of the run's optimizer steps.
        dtype: dtype the weights are loaded in. Use ``float32`` with ``trainer.precision: bf16-mixed``, or
            ``bfloat16`` with ``bf16-true`` to halve weight memory.
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2``, ``flex_attention``...; all of these honour
            padding-free batches (the block-diagonal mask comes from ``position_ids``).
        model_revision: hub revision (branch, tag or commit) of the model.
        trust_remote_code: allow code from the model's repository to run.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% more compute).
        use_peft: train LoRA adapters instead of all weights.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).
        lora_dropout: dropout on the LoRA input.
        lora_target_modules: module names to adapt, or ``all-linear``.
        lora_modules_to_save: modules trained in full alongside the adapters (e.g. ``lm_head``).
        use_rslora: rank-stabilized LoRA scaling.
        use_dora: weight-decomposed LoRA (DoRA).
        load_in_4bit: QLoRA: load the base weights in 4-bit NF4 with bitsandbytes (implies ``use_peft``).
        load_in_8bit: load the base weights in 8-bit with bitsandbytes (implies ``use_peft``).
        logits_chunk_size: rows per chunk when computing log-probs and entropy (bounds memory on large vocabularies).
        max_new_tokens: tokens generated per prompt by ``predict``.
        training_health: add the ``TrainingHealth`` callback (warnings with evidence and actions, ``health.jsonl``)
            unless the trainer has one; False turns it off.
    """

    def __init__(
        self,
        model: str = "ltpost:tiny-llama",
        loss_type: Literal["nll", "dft"] = "nll",
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        adam_beta1: float = 0.9,
        adam_beta2: float = 0.999,
        adam_epsilon: float = 1e-8,
        lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear",
        warmup_steps: int = 0,
        warmup_ratio: float = 0.0,
        dtype: Dtype = "float32",
        attn_implementation: str | None = "sdpa",
        model_revision: str | None = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        use_peft: bool = False,
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | str = "all-linear",
        lora_modules_to_save: list[str] | None = None,
        use_rslora: bool = False,
        use_dora: bool = False,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        logits_chunk_size: int = 4096,
        max_new_tokens: int = 64,
        training_health: bool = True,
    ) -> None:
        super().__init__()
        if loss_type not in SFT_LOSSES:
            raise ValueError(f"Unknown loss_type {loss_type!r}; choose one of {sorted(SFT_LOSSES)}.")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}.")
        self.save_hyperparameters()
        self.model_name = model
        self.loss_fn = SFT_LOSSES[loss_type]
        self.model = None
        self.tokenizer = None  # set by configure_model; HFExport saves it beside the weights
        self.num_tokens = 0  # cumulative non-padding input tokens on this rank (a Python int: no device sync)

    def configure_model(self) -> None:
        if self.model is not None:  # Lightning calls this hook on every fit/validate/test/predict
            return
        hp = self.hparams
        self.model = load_trainable_model(hp)
        self.tokenizer = load_tokenizer(hp.model, revision=hp.model_revision, trust_remote_code=hp.trust_remote_code)

    # -- steps ---------------------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Logits ``[B, T, V]`` for a batch from ``collate_sft`` (padding-free batches carry no attention mask).

        ``use_cache=False`` is load-bearing: transformers derives the block-diagonal mask of a padding-free batch
        from ``position_ids`` only when no KV cache is in play; with the default cache the packed sequences
        attend to each other (measured: logits off by 1.0 on the tiny model).
        """
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch["position_ids"],
            use_cache=False,
        ).logits

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self(batch)  # [B, T, V]
        log_all = is_logging_step(self)  # diagnostics only when the logger writes them (see ltpost.metrics)
        loss, metrics = self.loss_fn(
            logits, batch["shift_labels"], self.hparams.logits_chunk_size, with_metrics=log_all
        )
        self.num_tokens += batch["num_tokens"]
        self._log_metrics("train", metrics, batch["num_loss_tokens"])
        log_padding_fraction(self, batch)
        if log_all:  # summed over ranks gives the global count: a scalar all-reduce on DDP
            self.log("train/num_tokens", float(self.num_tokens), reduce_fx="sum", sync_dist=True, batch_size=1)
        return {"loss": loss, **{k: v for k, v in metrics.items() if k != "loss"}}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("eval", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_step(self, prefix: str, batch: dict[str, Any]) -> None:
        # Held-out loss is always the NLL, whatever the training loss: it is the number comparable across runs
        # (DFT's objective -p*log(p) *rises* as the model improves, so it cannot say whether a run generalizes).
        logits = self(batch)  # [B, T, V]
        _, metrics = nll_loss(logits, batch["shift_labels"], self.hparams.logits_chunk_size)
        self._log_metrics(prefix, metrics, batch["num_loss_tokens"])

    def _log_metrics(self, prefix: str, metrics: dict[str, torch.Tensor], num_loss_tokens: int) -> None:
        # batch_size = loss tokens, so epoch-level values are token-weighted means, as a corpus-level loss should be.
        on_step = prefix == "train"
        for name, value in metrics.items():
            self.log(
                f"{prefix}/{name}",
                value,
                on_step=on_step,
                on_epoch=not on_step,
                prog_bar=name == "loss",
                sync_dist=not on_step,
                batch_size=num_loss_tokens,
            )

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[str]:
        """Greedy completions (decoded text) for a batch of left-padded prompts."""
        output = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=self.hparams.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        return self.tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    # -- optimization --------------------------------------------------------------------------------------------

    def on_before_optimizer_step(self, optimizer) -> None:
        log_grad_norm(self)  # train/grad_norm on logging steps (before clipping), read by TrainingHealth

    def configure_callbacks(self) -> list:
        return health_callbacks(self)

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_from_hparams(self.model, self.hparams, self.trainer.estimated_stepping_batches)

    # -- checkpoint state ----------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ltpost_num_tokens"] = self.num_tokens

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.num_tokens = checkpoint.get("ltpost_num_tokens", 0)
