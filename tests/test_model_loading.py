"""Models load as the run needs them: float32 weights unless --torch_dtype asks otherwise."""

from types import SimpleNamespace

import pytest
import torch
from conftest import script_module
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM

from ipu_trainer.cli import datasets as data_module
from ipu_trainer.cli.datasets import load_raw_datasets
from ipu_trainer.cli.model_loading import load_model, load_model_config, load_tokenizer
from ipu_trainer.cli.script_args import parse_script_args


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


# ---- the flags users paste from the transformers examples ----------------------------------------------------



@pytest.mark.parametrize("script", ["run_pretraining", "run_mlm", "run_clm"])
def test_token_trust_remote_code_and_dtype_flags_parse_in_every_script(script, monkeypatch):
    module = script_module(script)
    monkeypatch.setattr("sys.argv", [f"{script}.py", "--token", "hf_secret", "--trust_remote_code", "--dtype",
                                     "bfloat16", "--dataset_name", "x", "--output_dir", "o"])
    model_args, _, _ = parse_script_args(module.ModelArguments, module.DataTrainingArguments)
    assert (model_args.token, model_args.trust_remote_code, model_args.dtype) == ("hf_secret", True, "bfloat16")
    monkeypatch.setattr("sys.argv", [f"{script}.py", "--torch_dtype", "float16", "--dtype", "bfloat16",
                                     "--dataset_name", "x", "--output_dir", "o"])
    with pytest.raises(ValueError, match="--torch_dtype float16 and --dtype bfloat16 disagree"):
        parse_script_args(module.ModelArguments, module.DataTrainingArguments)


def test_token_and_trust_remote_code_reach_transformers_and_datasets(tmp_path, tokenizer_dir, monkeypatch):
    BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(tmp_path / "model")
    calls = {}

    def recording(name, original):
        def call(*args, **kwargs):
            calls[name] = kwargs
            return original(*args, **kwargs)
        return call

    monkeypatch.setattr(AutoConfig, "from_pretrained", recording("config", AutoConfig.from_pretrained))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", recording("tokenizer", AutoTokenizer.from_pretrained))
    class Recorded(Exception):
        pass

    def load_dataset(*args, **kwargs):
        calls["dataset"] = kwargs
        raise Recorded

    monkeypatch.setattr(data_module, "load_dataset", load_dataset)
    model_args = SimpleNamespace(config_name=str(tmp_path / "model"), model_name_or_path=None, model_type=None,
                                 config_overrides=None, tokenizer_name=tokenizer_dir, cache_dir=None,
                                 model_revision="main", use_auth_token=False, token="hf_secret", trust_remote_code=True,
                                 use_fast_tokenizer=True)
    load_model_config(model_args)
    load_tokenizer(model_args)
    (tmp_path / "data").mkdir()
    data_args = SimpleNamespace(dataset_name=str(tmp_path / "data"), dataset_config_name=None, data_dir=None,
                                validation_split_percentage=5)
    with pytest.raises(Recorded):
        load_raw_datasets(data_args, model_args)
    for name in ("config", "tokenizer"):
        assert calls[name]["token"] == "hf_secret" and calls[name]["trust_remote_code"] is True, name
    assert calls["dataset"]["token"] == "hf_secret"  # datasets 5 runs no dataset code, so it takes no trust flag


def test_a_tokenizer_folder_loads_without_an_empty_config_dump(tokenizer_dir, transformers_log):
    """A folder holding only a tokenizer has no config.json; transformers used to log the empty model config it
    builds in its place."""
    model_args = SimpleNamespace(tokenizer_name=tokenizer_dir, model_name_or_path=None, cache_dir=None)
    tokenizer = load_tokenizer(model_args)
    assert not [r for r in transformers_log.records if "config" in r.getMessage().lower() and "{" in r.getMessage()]
    assert type(tokenizer) is type(AutoTokenizer.from_pretrained(tokenizer_dir))  # the class transformers picks itself
    assert "Model config PreTrainedConfig {" in transformers_log.text  # which the plain call logs


def test_missing_tokenizer_points_at_the_offline_assets_module():
    args = SimpleNamespace(tokenizer_name=None, model_name_or_path=None)
    with pytest.raises(ValueError, match=r"python -m ipu_trainer\.cli\.offline_assets quickstart"):
        load_tokenizer(args)
