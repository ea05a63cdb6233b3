"""HFExport: the exported folder loads with from_pretrained and gives the trained module's logits."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ltpost import HFExport, SFTDataModule, SFTModule
from tests.helpers import cpu_trainer

PROBE = torch.tensor([[2, 88, 86, 279, 202, 335, 387, 503, 260, 473, 34, 3, 2, 68]])


def logits_of(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def train_and_export(tmp_path, export: HFExport, **module_kwargs) -> SFTModule:
    module = SFTModule(learning_rate=1e-2, **module_kwargs)
    data = SFTDataModule(batch_size=4, max_train_samples=16, eval_split=None)
    trainer = cpu_trainer(tmp_path, max_steps=2, callbacks=[export])
    trainer.fit(module, datamodule=data)
    return module


def test_full_model_round_trip(tmp_path):
    export = HFExport(dirpath=str(tmp_path / "hf"))
    module = train_and_export(tmp_path, export)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    diff = (logits_of(reloaded) - logits_of(module.model)).abs().max().item()
    assert diff <= 1e-5, diff
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert "{% generation %}" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    assert reloaded.generation_config.eos_token_id == tokenizer.eos_token_id


def test_lora_adapter_round_trip(tmp_path):
    export = HFExport(dirpath=str(tmp_path / "adapter"))
    module = train_and_export(tmp_path, export, use_peft=True, lora_r=4, lora_alpha=8)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")  # transformers resolves base + adapter
    diff = (logits_of(reloaded) - logits_of(module.model)).abs().max().item()
    assert diff <= 1e-5, diff


def test_lora_merged_round_trip_leaves_trainer_adapters_unmerged(tmp_path):
    export = HFExport(dirpath=str(tmp_path / "merged"), merge_lora=True)
    module = train_and_export(tmp_path, export, use_peft=True, lora_r=4, lora_alpha=8)
    assert (tmp_path / "merged" / "model.safetensors").exists()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora_" in name for name, _ in reloaded.named_parameters())
    diff = (logits_of(reloaded) - logits_of(module.model)).abs().max().item()
    assert diff <= 1e-5, diff
    lora_layers = [m for m in module.model.modules() if hasattr(m, "merged")]
    assert lora_layers and not any(m.merged for m in lora_layers)


def test_export_with_each_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    export = HFExport(dirpath=str(tmp_path / "hf"), on_checkpoint=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    module = SFTModule(learning_rate=1e-2)
    data = SFTDataModule(batch_size=4, max_train_samples=16, eval_split=None)
    trainer = cpu_trainer(tmp_path, max_steps=2, callbacks=[checkpoint, export], enable_checkpointing=True)
    trainer.fit(module, datamodule=data)
    assert (tmp_path / "hf" / "step-1" / "model.safetensors").exists()
    assert (tmp_path / "hf" / "step-2" / "model.safetensors").exists()
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_default_dirpath_is_in_the_log_dir(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    export = HFExport()
    module = SFTModule(learning_rate=1e-2)
    data = SFTDataModule(batch_size=4, max_train_samples=8, eval_split=None)
    trainer = cpu_trainer(tmp_path, max_steps=1, callbacks=[export], logger=TensorBoardLogger(tmp_path))
    trainer.fit(module, datamodule=data)
    assert export.last_export == str(tmp_path / "lightning_logs" / "version_0" / "hf_model")
    assert (tmp_path / "lightning_logs" / "version_0" / "hf_model" / "config.json").exists()
