"""Load causal LMs, sequence classifiers and tokenizers by hub id, local path or built-in name; LoRA and QLoRA.

Everything goes through ``from_pretrained``: a built-in name (``ltpost:tiny-llama``) is first materialized
into a local folder (see ``ltpost.assets``). Modules call these functions from ``configure_model()`` so that
sharding strategies see the model only once it is built.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ltpost import assets

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


def resolve(name: str) -> str:
    """A loadable location for ``name``: a built-in name becomes its local folder; anything else is unchanged."""
    if assets.is_builtin(name):
        return str(assets.materialize_builtin_model(name))
    return name


def load_tokenizer(
    name: str, *, revision: str | None = None, trust_remote_code: bool = False, chat_template: str | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer of ``name``, with a pad token guaranteed (the EOS token when the checkpoint has none).

    Args:
        name: hub id, local path or built-in name.
        revision: hub revision (branch, tag or commit).
        trust_remote_code: allow code from the checkpoint's repository to run.
        chat_template: a Jinja chat template, or a path to a file holding one, replacing the tokenizer's.
    """
    if assets.is_builtin(name):
        tokenizer = assets.load_builtin_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        if chat_template.endswith(".jinja"):
            with open(chat_template) as handle:
                chat_template = handle.read()
        tokenizer.chat_template = chat_template
    return tokenizer


def quantization_config(
    load_in_4bit: bool, load_in_8bit: bool, compute_dtype: torch.dtype
) -> BitsAndBytesConfig | None:
    """QLoRA's recipe: 4-bit NF4 with double quantization (or plain 8-bit); None when neither is asked for."""
    if load_in_4bit and load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit are exclusive: set at most one of them.")
    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(
    name: str,
    *,
    task: Literal["causal-lm", "sequence-classification"] = "causal-lm",
    num_labels: int = 1,
    dtype: Dtype = "float32",
    attn_implementation: str | None = "sdpa",
    revision: str | None = None,
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    gradient_checkpointing: bool = False,
) -> PreTrainedModel:
    """A model from a hub id, local path (full checkpoint or PEFT adapter folder) or built-in name.

    Quantized (QLoRA) models are prepared for k-bit training: norms in float32, inputs requiring grad.
    Gradient checkpointing uses the non-reentrant implementation, which works with frozen embeddings (LoRA).
    """
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    compute_dtype = torch.float32 if dtype in ("auto", "float32") else torch_dtype
    kwargs = dict(
        dtype=torch_dtype,
        revision=revision,
        trust_remote_code=trust_remote_code,
        quantization_config=quantization_config(load_in_4bit, load_in_8bit, compute_dtype),
    )
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(resolve(name), **kwargs)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(resolve(name), num_labels=num_labels, **kwargs)
        if model.config.pad_token_id is None:  # the classifier pools the last non-pad token and needs to find it
            model.config.pad_token_id = load_tokenizer(name, revision=revision).pad_token_id
    if load_in_4bit or load_in_8bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def add_lora(
    model: PreTrainedModel,
    *,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: list[str] | str = "all-linear",
    modules_to_save: list[str] | None = None,
    use_rslora: bool = False,
    use_dora: bool = False,
    task_type: Literal["CAUSAL_LM", "SEQ_CLS"] = "CAUSAL_LM",
):
    """Wrap ``model`` in LoRA adapters; only the adapters (and ``modules_to_save``) stay trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        use_rslora=use_rslora,
        use_dora=use_dora,
        task_type=task_type,
    )
    return get_peft_model(model, config)


def load_trainable_model(
    hp, name: str | None = None, task: Literal["causal-lm", "sequence-classification"] = "causal-lm"
):
    """The model a module trains, from its standard hyperparameters (``model``, ``dtype``, LoRA/QLoRA switches...).

    Every module names these arguments the same way, so one function reads them; ``name`` overrides
    ``hp.model`` (e.g. for a reference model) and then no adapters are added.
    """
    model = load_model(
        name or hp.model,
        task=task,
        dtype=hp.dtype,
        attn_implementation=hp.attn_implementation,
        revision=hp.model_revision,
        trust_remote_code=hp.trust_remote_code,
        load_in_4bit=hp.load_in_4bit and name is None,
        load_in_8bit=hp.load_in_8bit and name is None,
        gradient_checkpointing=hp.gradient_checkpointing and name is None,
    )
    if name is None and (hp.use_peft or hp.load_in_4bit or hp.load_in_8bit):
        model = add_lora(
            model,
            r=hp.lora_r,
            alpha=hp.lora_alpha,
            dropout=hp.lora_dropout,
            target_modules=hp.lora_target_modules,
            modules_to_save=hp.lora_modules_to_save,
            use_rslora=hp.use_rslora,
            use_dora=hp.use_dora,
            task_type="CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS",
        )
    return model.train()  # from_pretrained returns eval mode; Lightning keeps whatever mode it finds
