"""Models, configs and the IPU config load as the run needs them: float32 weights unless --torch_dtype asks otherwise,
the IPU config from a folder, a .json file or the hub (its cache when the hub cannot be asked)."""

import json
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from conftest import cache_hub_file
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM

import ipu_trainer.config.ipu_config as ipu_config_module
from ipu_trainer.cli import datasets as data_module
from ipu_trainer.cli import hub
from ipu_trainer.cli.datasets import load_raw_datasets
from ipu_trainer.cli.model_loading import load_ipu_config, load_model, load_model_config, load_tokenizer


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


# ---- the IPU config file ------------------------------------------------------------------------------------


def ipu_args(name, pod_type=None):
    return SimpleNamespace(ipu_config_name=name, pod_type=pod_type)


def test_the_ipu_config_of_a_folder_a_file_or_a_cached_hub_id_is_loaded(tmp_path, monkeypatch, offline):
    per_pod = json.dumps({"layers_per_ipu": [1, 2], "device_iterations": {"default": 1, "pod16": 8}})
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "ipu_config.json").write_text(per_pod)
    assert load_ipu_config(ipu_args(None), str(tmp_path / "folder")).layers_per_ipu == [1, 2]
    assert load_ipu_config(ipu_args(str(tmp_path / "folder" / "ipu_config.json"), "pod16"), None).device_iterations == 8
    (tmp_path / "model").mkdir()
    with pytest.raises(ValueError, match=r"You must provide an IPUConfig: --model_name_or_path .*model holds no ipu_config"):
        load_ipu_config(ipu_args(None), str(tmp_path / "model"))
    with pytest.raises(FileNotFoundError, match=r"--ipu_config_name .*model: the folder holds no ipu_config.json"):
        load_ipu_config(ipu_args(str(tmp_path / "model")), None)
    # A hub id: the cached file, without asking the hub (HF_HUB_OFFLINE=1).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    cache_hub_file(tmp_path / "cache", "someone/ipu", "ipu_config.json", per_pod)
    assert load_ipu_config(ipu_args("someone/ipu", "pod16"), None).device_iterations == 8
    with pytest.raises(hub.HubError, match="--ipu_config_name someone/other: .*HF_HUB_OFFLINE=1 is set"):
        load_ipu_config(ipu_args("someone/other"), None)


def test_a_hub_repository_without_an_ipu_config_is_one_line(monkeypatch):
    import httpx2
    from huggingface_hub.errors import RemoteEntryNotFoundError

    def no_such_file(**kwargs):
        url = f"https://huggingface.co/{kwargs['repo_id']}/resolve/main/ipu_config.json"
        response = httpx2.Response(404, request=httpx2.Request("HEAD", url))
        raise RemoteEntryNotFoundError("404 Client Error.\n\nEntry Not Found", response=response)

    monkeypatch.setattr(hub, "hub_usable", lambda: True)
    monkeypatch.setattr(ipu_config_module, "hf_hub_download", no_such_file)
    with pytest.raises(hub.HubError, match="^--ipu_config_name someone/model: the hub repository holds no ipu_config.json$"):
        load_ipu_config(ipu_args("someone/model"), None)
    with pytest.raises(ValueError, match="^You must provide an IPUConfig: someone/model on the hub has no ipu_config.json"):
        load_ipu_config(ipu_args(None), "someone/model")
