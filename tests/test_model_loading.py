"""Models load as the run needs them: float32 weights unless --torch_dtype asks otherwise."""

from types import SimpleNamespace

import torch
from transformers import AutoModelForMaskedLM, BertConfig, BertForMaskedLM

from ipu_trainer.model_loading import load_model


def model_args(path):
    return SimpleNamespace(model_name_or_path=str(path), cache_dir=None, model_revision="main", use_auth_token=False)


def test_a_bfloat16_checkpoint_trains_in_float32_unless_asked(tmp_path, tokenizer):
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    BertForMaskedLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    loaded_config = BertConfig.from_pretrained(tmp_path / "bf16")
    model = load_model(AutoModelForMaskedLM, model_args(tmp_path / "bf16"), loaded_config, tokenizer)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    kept = load_model(AutoModelForMaskedLM, model_args(tmp_path / "bf16"), loaded_config, tokenizer, dtype=torch.bfloat16)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    auto = load_model(AutoModelForMaskedLM, model_args(tmp_path / "bf16"), loaded_config, tokenizer, dtype="auto")
    assert {p.dtype for p in auto.parameters()} == {torch.bfloat16}
