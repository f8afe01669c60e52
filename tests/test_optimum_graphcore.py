"""Code written for optimum-graphcore runs through the `optimum.graphcore` import path.

Imports are written exactly as optimum-graphcore 0.7's examples and its own unit tests write them. The
expected IPUConfig values are derived from that release's source (its `ipu_configuration.py`,
`modeling_utils.py` and `tests/test_ipu_configuration.py`); where this project deliberately differs,
the test says so.
"""

import copy
import functools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, default_data_collator
from transformers.trainer_utils import TrainOutput

from optimum.graphcore import IPUConfig, IPUTrainer
from optimum.graphcore import IPUTrainingArguments as TrainingArguments
from optimum.graphcore.data import DataCollatorForLanguageModelingWithMaxTokensMasked, pad_on_batch_axis
from optimum.graphcore.ipu_configuration import IncompatibleIPUConfigError
from optimum.graphcore.modeling_utils import get_layer_ipu, split_encoder_decoder_ipu_config
from optimum.graphcore.utils import check_min_version as gc_check_min_version
from tiny import masked_pairs, tiny_bert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGINAL_STYLE = os.path.join(REPO, "tests", "original_style")


# ---- the import path re-exports this package's objects --------------------------------------------------


def test_the_import_path_serves_ipu_trainers_own_objects():
    import ipu_trainer
    import optimum.graphcore as graphcore
    from optimum.graphcore import IPUTrainerState
    from optimum.graphcore.data.data_collator import pad_on_batch_axis as nested_pad
    from optimum.graphcore.trainer import IPUTrainer as trainer_module_class
    from optimum.graphcore.training_args import ALLOWED_N_IPU, IPUTrainingArguments

    assert graphcore.IPUConfig is ipu_trainer.IPUConfig
    assert IPUTrainer is trainer_module_class is ipu_trainer.IPUTrainer
    assert TrainingArguments is IPUTrainingArguments is ipu_trainer.IPUTrainingArguments
    assert DataCollatorForLanguageModelingWithMaxTokensMasked is ipu_trainer.DataCollatorForLanguageModelingWithMaxTokensMasked
    assert pad_on_batch_axis is nested_pad is ipu_trainer.pad_on_batch_axis
    assert IncompatibleIPUConfigError is ipu_trainer.IncompatibleIPUConfigError
    assert ALLOWED_N_IPU == [1, 2, 4, 8, 16, 32, 64]
    from transformers import TrainerState

    assert IPUTrainerState is TrainerState


def test_check_min_version():
    import optimum.graphcore.utils as utils

    gc_check_min_version("0.6.0.dev0")
    utils.check_min_version("0.7.1")
    utils.gc_check_min_version("0.2.4.dev")
    with pytest.raises(ImportError, match="requires optimum-graphcore >= 0.8.0"):
        gc_check_min_version("0.8.0")
    with pytest.raises(ImportError, match="source install"):
        gc_check_min_version("0.7.2.dev0")


def run_python(code, pythonpath, cwd):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd,
                          env=environment, timeout=300)


@pytest.mark.slow
def test_coexists_with_an_installed_optimum_and_warns_about_the_real_optimum_graphcore(tmp_path):
    # Another distribution's portion of the optimum namespace (as the optimum package installs it).
    other = tmp_path / "site"
    (other / "optimum" / "exporters").mkdir(parents=True)
    (other / "optimum" / "exporters" / "__init__.py").write_text("NAME = 'exporters'\n")
    result = run_python("""
        import warnings
        warnings.simplefilter("error", UserWarning)  # no warning without the real optimum-graphcore
        import optimum.exporters, optimum.graphcore
        print(optimum.exporters.NAME, optimum.graphcore.IPUConfig.__module__)
    """, [REPO, str(other)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["exporters", "ipu_trainer.config.ipu_config"]

    # The real optimum-graphcore installed as well (its package folder and its metadata), later on the path.
    real = tmp_path / "real"
    (real / "optimum" / "graphcore").mkdir(parents=True)
    (real / "optimum" / "graphcore" / "__init__.py").write_text("raise ImportError('the real one was imported')\n")
    (real / "optimum_graphcore-0.7.1.dist-info").mkdir()
    (real / "optimum_graphcore-0.7.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: optimum-graphcore\nVersion: 0.7.1\n"
    )
    result = run_python("import optimum.graphcore", [REPO, str(real)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimum-graphcore is also installed at" in result.stderr
    assert str(real / "optimum" / "graphcore") in result.stderr
    assert os.path.join(REPO, "optimum", "graphcore") in result.stderr


@pytest.mark.slow
def test_the_package_ships_optimum_graphcore_as_a_namespace_portion(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    for package in ("ipu_trainer", "optimum"):
        shutil.copytree(os.path.join(REPO, package), source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = list((tmp_path / "wheel").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("__init__", "data/__init__", "data/data_collator", "utils", "ipu_configuration", "training_args",
                   "trainer", "modeling_utils"):
        assert f"optimum/graphcore/{module}.py" in names
    assert "optimum/__init__.py" not in names
    # Installed from the wheel (into a folder of its own), it imports without the repository on the path.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    result = run_python("import optimum.graphcore, ipu_trainer; print(optimum.graphcore.__file__)", [str(site)],
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith(str(site))


# ---- IPUConfig: the original's tests, values derived from its source -----------------------------------


def create_ipu_config():
    """The original tests' helper: a default config through to_dict / from_dict, random output mode."""
    initial = IPUConfig().to_dict()
    initial["output_mode"] = random.choice(["all", "sum", "final"])
    initial["execute_encoder_on_cpu_for_generation"] = False
    return IPUConfig.from_dict(initial)


def create_mode_ipu_config(attributes, mode):
    helper = IPUConfig()
    helper.mode = mode
    config = IPUConfig(**{helper._get_managed_attr_mode_name(name): value for name, value in attributes.items()})
    config.mode = mode
    return config


def test_attribute_default_values():
    assert IPUConfig(layers_per_ipu=[1, 2, 3]).ipus_per_replica == 3
    config = IPUConfig(layers_per_ipu=[1, 2, 3, 4], matmul_proportion=[0.1, 0.2, 0.3, 0.4])
    assert config.inference_matmul_proportion == [0.1, 0.2, 0.3, 0.4]
    config = IPUConfig(layers_per_ipu=[1, 2, 3, 4], matmul_proportion=[0.1, 0.2, 0.3, 0.4],
                       inference_layers_per_ipu=[3, 7])
    assert config.inference_matmul_proportion == 0.2
    assert IPUConfig(ipus_per_replica=10).inference_ipus_per_replica == 10
    assert IPUConfig(ipus_per_replica=10, inference_layers_per_ipu=[1, 2, 3]).inference_ipus_per_replica == 3
    config = IPUConfig()
    assert (config.projection_serialization_factor, config.inference_projection_serialization_factor) == (1, 1)
    assert (config.embedding_serialization_factor, config.inference_embedding_serialization_factor) == (1, 1)
    # The inference twins are filled when the config is built (they were left None before).
    config = IPUConfig(layers_per_ipu=[0, 4, 4, 4])
    assert (config.inference_layers_per_ipu, config.inference_ipus_per_replica) == ([0, 4, 4, 4], 4)
    assert config.eval().layers_per_ipu == [0, 4, 4, 4] and config._layers_per_ipu == [0, 4, 4, 4]


def test_a_value_that_follows_keeps_following_until_it_is_set():
    config = IPUConfig()
    config.layers_per_ipu = [1, 3, 4, 4]
    assert (config.ipus_per_replica, config.inference_layers_per_ipu, config.inference_ipus_per_replica) == (
        4, [1, 3, 4, 4], 4)
    config.ipus_per_replica = 4
    config.layers_per_ipu = [-1]
    assert config.ipus_per_replica == 4  # set, so it no longer follows
    assert config.to_dict()["inference_layers_per_ipu"] is None  # still following: stored as null
    config.ipus_per_replica = None
    assert config.ipus_per_replica == 1


def test_to_dict_round_trip_and_batch_size_factor():
    config = create_ipu_config()
    assert IPUConfig.from_dict(config.to_dict()) == config
    for for_inference in (False, True):
        replication = config.inference_replication_factor if for_inference else config.replication_factor
        accumulation = 1 if for_inference else config.gradient_accumulation_steps
        iterations = config.inference_device_iterations if for_inference else config.device_iterations
        assert config.batch_size_factor(for_inference=for_inference) == replication * accumulation * iterations


def test_to_options_is_ipu_only():
    with pytest.raises(NotImplementedError, match="no meaning off the IPU"):
        create_ipu_config().to_options(for_inference=True)
    from optimum.graphcore.modeling_utils import to_pipelined

    with pytest.raises(NotImplementedError, match="no meaning off the IPU"):
        to_pipelined(tiny_bert(), IPUConfig())


def test_layers_per_ipu():
    assert IPUConfig(layers_per_ipu=[1, 2]).ipus_per_replica == 2
    assert get_layer_ipu(IPUConfig(layers_per_ipu=[1, 2]), 3) == [0, 1, 1]
    assert get_layer_ipu(IPUConfig(layers_per_ipu=[1, 2])) == [0, 1, 1]
    for target in (2, 4):
        with pytest.raises(IncompatibleIPUConfigError,
                           match="layers_per_ipu does not define the correct number of layers for the current model"):
            get_layer_ipu(IPUConfig(layers_per_ipu=[1, 2]), target)
    with pytest.raises(IncompatibleIPUConfigError,
                       match="layers_per_ipu has a non-default value set, but its length does not match ipus_per_replica"):
        get_layer_ipu(IPUConfig(layers_per_ipu=[1, -1], ipus_per_replica=4), 3)
    assert get_layer_ipu(IPUConfig(), 9) == [0] * 9
    assert get_layer_ipu(IPUConfig(ipus_per_replica=2), 6) == [0, 0, 0, 1, 1, 1]
    assert get_layer_ipu(IPUConfig(ipus_per_replica=2), 7) == [0, 0, 0, 1, 1, 1, 1]
    assert get_layer_ipu(IPUConfig(layers_per_ipu=[2, -1]), 6) == [0, 0, 1, 1, 1, 1]
    assert get_layer_ipu(IPUConfig(layers_per_ipu=[-1, 2]), 6) == [0, 0, 0, 0, 1, 1]
    assert get_layer_ipu(IPUConfig(layers_per_ipu=[-1, 2, -1, 2]), 7) == [0, 1, 1, 2, 2, 3, 3]
    assert get_layer_ipu(IPUConfig(layers_per_ipu=[-1, -1, -1]), 13) == [0] * 4 + [1] * 4 + [2] * 5
    assert get_layer_ipu(IPUConfig(layers_per_ipu=[1, -1, -1, -1]), 12) == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3]
    assert get_layer_ipu(IPUConfig(layers_per_ipu=[0, 4, 4, 4]), 12) == [1] * 4 + [2] * 4 + [3] * 4
    assert get_layer_ipu(IPUConfig(layers_per_ipu=[1, 2]), torch.nn.ModuleList([torch.nn.Identity()] * 3)) == [0, 1, 1]


@pytest.mark.parametrize("mode", IPUConfig.modes)
def test_layers_per_ipu_wildcard(mode):
    config = create_mode_ipu_config({"ipus_per_replica": 4, "layers_per_ipu": [-1]}, mode)
    assert get_layer_ipu(config, 8) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert config._ipus_per_replica == 4


def test_split_encoder_decoder_ipu_config():
    encoder, decoder = split_encoder_decoder_ipu_config(IPUConfig(layers_per_ipu=[1, 2]), 1, 2)
    assert (encoder.layers_per_ipu, encoder.ipus_per_replica, decoder.layers_per_ipu, decoder.ipus_per_replica) == (
        [1], 1, [2], 1)
    config = IPUConfig(layers_per_ipu=[2, 2, 2, 2], matmul_proportion=[0.1, 0.2, 0.3, 0.4])
    encoder, decoder = split_encoder_decoder_ipu_config(config, 4, 4)
    assert (encoder.matmul_proportion, decoder.matmul_proportion) == ([0.1, 0.2], [0.3, 0.4])
    for splits in ("serialized_projection_splits_per_ipu", "serialized_embedding_splits_per_ipu"):
        with pytest.raises(ValueError, match="must have all splits placed on the"):
            split_encoder_decoder_ipu_config(IPUConfig(layers_per_ipu=[0, 2, 2, 0], **{splits: [0, 2, 2, 0]}), 2, 2)
    original, encoder_dict, decoder_dict = config.to_dict(), encoder.to_dict(), decoder.to_dict()
    for key in original:
        if not re.search("layers_per_ipu|ipus_per_replica|matmul_proportion", key):
            assert original[key] == encoder_dict[key] == decoder_dict[key], key
    encoder, decoder = split_encoder_decoder_ipu_config(IPUConfig(layers_per_ipu=[-1, -1]), 2, 3)
    assert (encoder.layers_per_ipu, decoder.layers_per_ipu) == ([2], [3])
    with pytest.raises(IncompatibleIPUConfigError, match="layers_per_ipu does not define the correct number of layers"):
        split_encoder_decoder_ipu_config(IPUConfig(layers_per_ipu=[1, 2]), 2, 2)
    with pytest.raises(IncompatibleIPUConfigError, match="Unable to find a valid split of ipu_config.layers_per_ipu"):
        split_encoder_decoder_ipu_config(IPUConfig(layers_per_ipu=[4, 3]), 3, 4)
    with pytest.raises(IncompatibleIPUConfigError,
                       match="Need ipus_per_replica to be at least 2 to split ipu_config into encoder and decoder"):
        split_encoder_decoder_ipu_config(IPUConfig(layers_per_ipu=[4]), 2, 2)
    for layers, counts, expected in [
        ([1, 2, 3, 0, 5, 6, 7, 8], (6, 26), ([1, 2, 3, 0], [5, 6, 7, 8])),  # the power-of-two cut of two
        ([0, 6, 0, 6], (6, 6), ([0, 6], [0, 6])),
        ([3, 0, 3, 0, 0, 7], (6, 7), ([3, 0, 3, 0], [0, 7])),
    ]:
        encoder, decoder = split_encoder_decoder_ipu_config(IPUConfig(layers_per_ipu=layers), *counts)
        assert (encoder.layers_per_ipu, decoder.layers_per_ipu) == expected
        assert (encoder.ipus_per_replica, decoder.ipus_per_replica) == tuple(map(len, expected))


@pytest.mark.parametrize("mode", IPUConfig.modes)
def test_split_encoder_decoder_ipu_config_per_mode(mode):
    config = create_mode_ipu_config({
        "layers_per_ipu": [1, 2, 3, 4], "matmul_proportion": [0.1, 0.2, 0.3, 0.4], "ipus_per_replica": 4,
        "serialized_projection_splits_per_ipu": [0, 0, 2, 2], "serialized_embedding_splits_per_ipu": [2, 2, 0, 0],
    }, mode)
    encoder, decoder = split_encoder_decoder_ipu_config(config, 3, 7)
    assert (encoder._layers_per_ipu, encoder._ipus_per_replica, encoder._matmul_proportion) == ([1, 2], 2, [0.1, 0.2])
    assert (encoder._serialized_projection_splits_per_ipu, encoder._serialized_embedding_splits_per_ipu) == (None, [2, 2])
    assert (decoder._layers_per_ipu, decoder._ipus_per_replica, decoder._matmul_proportion) == ([3, 4], 2, [0.3, 0.4])
    assert (decoder._serialized_projection_splits_per_ipu, decoder._serialized_embedding_splits_per_ipu) == ([2, 2], None)


def test_mode_set():
    config = IPUConfig()
    assert config.mode == "training"
    assert config.train() is config and config.mode == "training"
    assert config.eval() is config and config.mode == "inference"
    with pytest.raises(ValueError, match="`IPUConfig` mode can only take"):
        config.mode = "invalid"


MODE_ATTRIBUTES = {
    "layers_per_ipu": [1, 2, 3, 4], "matmul_proportion": 0.6, "ipus_per_replica": 4,
    "serialized_projection_splits_per_ipu": [4], "serialized_embedding_splits_per_ipu": [4],
    "projection_serialization_factor": 4, "embedding_serialization_factor": 4,
}


@pytest.mark.parametrize("mode", IPUConfig.modes)
@pytest.mark.parametrize("name, value", MODE_ATTRIBUTES.items())
def test_attr_mode_retrieval(name, value, mode):
    config = create_mode_ipu_config({name: value}, mode)
    assert getattr(config, f"_{name}") == value
    # The public name always means the training value.
    if mode == "inference":
        assert getattr(config, f"inference_{name}") == value


GEQ_ATTRIBUTES = {
    "layers_per_ipu": [-1], "matmul_proportion": [0.2, 0.3, 0.0, 0.4], "replication_factor": 1,
    "gradient_accumulation_steps": 1, "ipus_per_replica": 1, "embedding_serialization_factor": 1,
    "device_iterations": 1, "projection_serialization_factor": 1,
}


@pytest.mark.parametrize("mode", IPUConfig.modes)
@pytest.mark.parametrize("name, value", GEQ_ATTRIBUTES.items())
def test_contents_geq_value_validator(name, value, mode):
    config = IPUConfig()
    config.mode = mode
    name = config._get_managed_attr_mode_name(name)
    setattr(config, name, copy.deepcopy(value))  # no cross-field check on assignment
    if isinstance(value, list):
        value = list(value)
        value[min(range(len(value)), key=value.__getitem__)] -= 1
    else:
        value -= 1
    with pytest.raises(ValueError, match=f"`IPUConfig` attribute `{name}` must .* >="):
        setattr(config, name, value)


def test_assignment_is_validated():
    config = IPUConfig()
    with pytest.raises(ValueError, match="`replication_factor` must be >= 1"):
        config.replication_factor = 0
    with pytest.raises(TypeError):
        config.gradient_accumulation_steps = 2.5
    assert (config.replication_factor, config.gradient_accumulation_steps) == (1, 1)


def test_output_mode_validator():
    with pytest.raises(ValueError):
        IPUConfig(output_mode="invalid")
    for output_mode in ("all", "sum", "final", "default"):
        IPUConfig(output_mode=output_mode)


@pytest.mark.parametrize("mode", IPUConfig.modes)
@pytest.mark.parametrize("layer", ["projection", "embedding"])
def test_serialized_splits_per_ipu_validator(layer, mode):
    config = IPUConfig()
    config.mode = mode
    name = config._get_managed_attr_mode_name(f"serialized_{layer}_splits_per_ipu")
    with pytest.raises(ValueError, match=f"`IPUConfig` attribute `{name}` must .* >="):
        setattr(config, name, [0, 2, 2, -1])
    with pytest.raises(ValueError, match=re.escape(f"`IPUConfig` attribute `{name}=[0, 0]` must have atleast 1 split")):
        setattr(config, name, [0, 0])
    with pytest.raises(ValueError, match=re.escape(f"`IPUConfig` attribute `{name}=[0, 3, 0, 2]` must have its splits on")):
        setattr(config, name, [0, 3, 0, 2])


@pytest.mark.parametrize("mode", IPUConfig.modes)
def test_validate_ipu_config(mode):
    proportion = [0.2] * 5
    with pytest.raises(IncompatibleIPUConfigError, match=re.escape(f"matmul_proportion={proportion} should use the same number")):
        create_mode_ipu_config({"ipus_per_replica": 4, "matmul_proportion": proportion}, mode)
    layers = [2] * 5
    with pytest.raises(IncompatibleIPUConfigError, match=re.escape(f"layers_per_ipu={layers} should use the same number")):
        create_mode_ipu_config({"ipus_per_replica": 4, "layers_per_ipu": layers}, mode)
    for layer in ("projection", "embedding"):
        with pytest.raises(ValueError, match=f"Only one of .*{layer}.*"):
            create_mode_ipu_config({f"{layer}_serialization_factor": 2, f"serialized_{layer}_splits_per_ipu": [1, 1]},
                                   mode)
        with pytest.raises(ValueError, match=f".*{layer}.*=\\[0, 0, 1, 1\\] should use the same number of IPUs as"):
            create_mode_ipu_config({"ipus_per_replica": 8, f"serialized_{layer}_splits_per_ipu": [0, 0, 1, 1]}, mode)


def test_where_this_project_is_looser_than_the_original_files_keep_loading(tmp_path):
    # The examples' own ipu_config.json: one matmul_proportion for a 4-IPU pipeline, keys of older releases.
    config = IPUConfig.from_pretrained(REPO)
    assert (config.ipus_per_replica, config.matmul_proportion) == (4, [0.25])
    assert config.async_dataloader is True
    # A file written by optimum-graphcore 0.7 carries its base config's bookkeeping keys.
    path = tmp_path / "ipu_config.json"
    written = {**IPUConfig(layers_per_ipu=[0, 4, 4, 4]).to_dict(), "optimum_version": "1.6.1",
               "transformers_version": "4.29.2"}
    path.write_text(json.dumps(written))
    assert IPUConfig.from_json_file(path).to_dict()["optimum_version"] == "1.6.1"
    # A serialization factor of 1 does not contradict splits.
    IPUConfig(layers_per_ipu=[-1, -1], embedding_serialization_factor=1, serialized_embedding_splits_per_ipu=[1, 1])


# ---- IPUConfig: the hub keywords and the serialisation API ---------------------------------------------


def test_from_pretrained_takes_the_scripts_hub_keywords(tmp_path, monkeypatch):
    config = IPUConfig(layers_per_ipu=[0, 4, 4, 4], gradient_accumulation_steps=8)
    assert config.save_pretrained(tmp_path / "local", push_to_hub=False) == tmp_path / "local" / IPUConfig.CONFIG_NAME
    config_kwargs = {"cache_dir": None, "revision": "main", "use_auth_token": None}
    assert IPUConfig.from_pretrained(str(tmp_path / "local"), **config_kwargs) == config
    reloaded, unused = IPUConfig.from_pretrained(str(tmp_path / "local"), device_iterations=2, foo=1,
                                                 return_unused_kwargs=True)
    assert (reloaded.device_iterations, unused) == (2, {"foo": 1})

    import ipu_trainer.config.ipu_config as module

    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(tmp_path / "local" / "ipu_config.json")

    monkeypatch.setattr(module, "hf_hub_download", fake_download)
    IPUConfig.from_pretrained("Graphcore/bert-base-ipu", cache_dir="/c", revision="v1", use_auth_token=True,
                              subfolder="sub", force_download=True)
    assert calls[0]["repo_id"] == "Graphcore/bert-base-ipu"
    assert (calls[0]["cache_dir"], calls[0]["revision"], calls[0]["token"]) == ("/c", "v1", True)
    assert (calls[0]["subfolder"], calls[0]["force_download"]) == ("sub", True)


def test_json_api(tmp_path):
    config = IPUConfig(layers_per_ipu=[1, 3], inference_device_iterations=4)
    assert json.loads(config.to_json_string(use_diff=True)) == config.to_diff_dict() == config.to_dict()
    assert json.loads(config.to_json_string(use_diff=False)) == config.to_dict()
    config.to_json_file(tmp_path / "c.json", use_diff=True)
    assert IPUConfig.from_json_file(tmp_path / "c.json") == config
    assert IPUConfig.from_dict(config.to_dict(), device_iterations=3).device_iterations == 3
    from optimum.graphcore.ipu_configuration import IPU_CONFIG_NAME

    assert IPU_CONFIG_NAME == IPUConfig.CONFIG_NAME == IPUConfig.FULL_CONFIGURATION_FILE == "ipu_config.json"


def test_push_to_hub_uploads_the_file(tmp_path, monkeypatch):
    import ipu_trainer.config.ipu_config as module

    uploads, repos = [], []
    monkeypatch.setattr(module, "create_repo", lambda repo_id, **kwargs: repos.append((repo_id, kwargs)))

    def fake_upload(**kwargs):
        uploads.append((kwargs["repo_id"], kwargs["path_in_repo"], json.loads(open(kwargs["path_or_fileobj"]).read())))

    monkeypatch.setattr(module, "upload_file", fake_upload)
    config = IPUConfig(device_iterations=4)
    config.push_to_hub("me/my-ipu-config", use_auth_token="t")
    config.save_pretrained(tmp_path / "folder", push_to_hub=True, commit_message="add")
    assert [(repo, kwargs["token"]) for repo, kwargs in repos] == [("me/my-ipu-config", "t"), ("folder", None)]
    assert [(repo, name, data["device_iterations"]) for repo, name, data in uploads] == [
        ("me/my-ipu-config", "ipu_config.json", 4), ("folder", "ipu_config.json", 4)]


# ---- pod types (optimum-graphcore 0.3-0.6) -------------------------------------------------------------

POD_TABLE = {"pod4": 1, "pod8": 2, "pod16": 4, "pod32": 8, "pod64": 16, "default": 1}


def test_pod_typed_values_and_the_pod_era_api(tmp_path):
    path = tmp_path / "ipu_config.json"
    path.write_text(json.dumps({"layers_per_ipu": [0, 4, 4, 4], "replication_factor": POD_TABLE,
                                "gradient_accumulation_steps": 16,
                                "device_iterations": {"pod16": 2, "pod64": 4, "default": 1}}))
    config = IPUConfig.from_pretrained(str(path))
    assert (config.replication_factor, config.device_iterations) == (1, 1)
    pod16 = config.for_pod_type("pod16")
    assert (pod16.replication_factor, pod16.device_iterations) == (4, 2)
    assert config.replication_factor == 1  # for_pod_type returns a copy
    pod64 = pod16.for_pod_type("pod64")  # a specialised config keeps its tables
    assert (pod64.replication_factor, pod64.device_iterations) == (16, 4)
    assert config.batch_size_factor(pod_type="pod64") == 16 * 16 * 4
    with pytest.raises(ValueError, match="device_iterations is given per POD type but has no entry for pod_type='pod32'"):
        config.for_pod_type("pod32")
    with pytest.raises(ValueError, match="pod_type='pod3' is not a POD type"):
        config.for_pod_type("pod3")
    config.replication_factor = 2  # set since: no longer from the table
    assert config.for_pod_type("pod16").replication_factor == 2


def test_pod_type_flag_maps_to_n_ipu(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), pod_type="pod16", report_to=[])
    assert args.n_ipu == 16
    with pytest.raises(ValueError, match="--pod_type pod16 means --n_ipu 16, which contradicts --n_ipu 8"):
        TrainingArguments(output_dir=str(tmp_path), pod_type="pod16", n_ipu=8)
    with pytest.raises(ValueError, match="--pod_type='pod3' is invalid"):
        TrainingArguments(output_dir=str(tmp_path), pod_type="pod3")


def test_the_trainer_specialises_a_pod_typed_config(tmp_path):
    config = IPUConfig(layers_per_ipu=[-1], replication_factor=POD_TABLE, device_iterations={"pod8": 3, "default": 1})
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=config, args=make_args(tmp_path, pod_type="pod8"),
                         data_collator=default_data_collator)
    # pod8: replication 8 // 1 IPU per replica (--n_ipu 8), device iterations from the table.
    assert (trainer.ipu_config.replication_factor, trainer.ipu_config.device_iterations) == (8, 3)
    assert config.device_iterations == 1


# ---- training arguments: the original's flags ------------------------------------------------------------


def test_the_originals_training_flags_are_accepted(tmp_path):
    from transformers import HfArgumentParser

    [args] = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--evaluation_strategy", "steps", "--eval_steps", "5", "--pod_type", "pod4",
        "--group_by_length", "--include_inputs_for_metrics", "--push_to_hub_model_id", "m",
        "--push_to_hub_organization", "org", "--push_to_hub_token", "t", "--past_index", "-1", "--report_to", "none",
        "--ipu_config_name", "x", "--dataloader_mode", "async_rebatched", "--lamb", "--compile_only",
    ])
    assert args.eval_strategy == "steps" and args.do_eval and args.n_ipu == 4
    assert args.train_sampling_strategy == "group_by_length" and args.include_for_metrics == ["inputs"]
    assert (args.hub_model_id, args.hub_token) == ("org/m", "t")
    with pytest.raises(ValueError, match="--past_index=1 is not supported"):
        TrainingArguments(output_dir=str(tmp_path), past_index=1)
    with pytest.raises(ValueError, match="--evaluation_strategy epoch and --eval_strategy steps contradict"):
        TrainingArguments(output_dir=str(tmp_path), evaluation_strategy="epoch", eval_strategy="steps")


# ---- IPUTrainer: the original's keywords -------------------------------------------------------------------


def make_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, per_device_eval_batch_size=2,
                  learning_rate=1e-3, max_steps=2, fp32=True, report_to=[], save_strategy="no", use_cpu=True,
                  seed=0, disable_tqdm=True)
    values.update(overrides)
    return TrainingArguments(**values)


class RecordingCollator:
    def __init__(self):
        self.sizes = []

    def __call__(self, examples):
        self.sizes.append(len(examples))
        return default_data_collator(examples)


def test_tokenizer_and_eval_data_collator_keywords(tmp_path, tokenizer):
    train_collator, eval_collator = RecordingCollator(), RecordingCollator()
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=IPUConfig(), args=make_args(tmp_path), tokenizer=tokenizer,
                         data_collator=train_collator, eval_data_collator=eval_collator, force_to_pipelined=True,
                         train_dataset=masked_pairs(8), eval_dataset=masked_pairs(6))
    assert trainer.tokenizer is tokenizer is trainer.processing_class
    trainer.train()
    trainer.evaluate()
    assert train_collator.sizes and eval_collator.sizes
    assert trainer.eval_data_collator is eval_collator and trainer.data_collator is train_collator
    with pytest.raises(TypeError, match="both tokenizer= and processing_class="):
        IPUTrainer(model=tiny_bert(), ipu_config=IPUConfig(), args=make_args(tmp_path), tokenizer=tokenizer,
                   processing_class=object())
    # Without eval_data_collator, evaluation uses data_collator, as in the original.
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=IPUConfig(), args=make_args(tmp_path),
                         data_collator=train_collator)
    assert trainer.eval_data_collator is train_collator


def schedule(optimizer, num_warmup_steps, num_training_steps, floor=0.0):
    def multiplier(step):
        if step < num_warmup_steps:
            return (step + 1) / (num_warmup_steps + 1)
        return max(floor, 1 - (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


@pytest.mark.parametrize("bound", [True, False])
def test_a_scheduler_partial_is_built_from_the_trainers_optimizer(tmp_path, bound):
    args = make_args(tmp_path, max_steps=4, warmup_ratio=0.5, learning_rate=1e-2, logging_steps=1)
    keywords = dict(num_warmup_steps=1, num_training_steps=4) if bound else {}
    partial = functools.partial(schedule, floor=0.6, **keywords)
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=IPUConfig(), args=args, data_collator=default_data_collator,
                         train_dataset=masked_pairs(8), optimizers=(None, partial))
    trainer.train()
    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert trainer.lr_scheduler.optimizer.param_groups[0]["params"][0] is next(trainer.model.parameters())
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    # The partial's own warmup of 1 step, or ceil(4 x 0.5) = 2 from the run where the partial left it out.
    reference = schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 1 if bound else 2, 4, floor=0.6)
    assert rates == pytest.approx([1e-2 * reference.lr_lambdas[0](step) for step in range(len(rates))])
    with pytest.raises(TypeError, match="pass one"):
        IPUTrainer(model=tiny_bert(), ipu_config=IPUConfig(), args=args, optimizers=(None, partial),
                   scheduler_factory=schedule)


def test_model_init(tmp_path):
    built = []

    def model_init():
        built.append(tiny_bert(seed=len(built)))
        return built[-1]

    config = IPUConfig(recompute_checkpoint_every_layer=True)
    trainer = IPUTrainer(ipu_config=config, args=make_args(tmp_path), model_init=model_init,
                         data_collator=default_data_collator, train_dataset=masked_pairs(8))
    assert len(built) == 1 and trainer.model is built[0] and built[0].is_gradient_checkpointing
    trainer.train()
    assert len(built) == 2 and trainer.model is built[1] and built[1].is_gradient_checkpointing
    assert trainer.state.global_step == 2
    with pytest.raises(RuntimeError, match="requires either a `model` or `model_init`"):
        IPUTrainer(ipu_config=config, args=make_args(tmp_path))
    with pytest.raises(RuntimeError, match="model_init` is incompatible with providing the `optimizers`"):
        IPUTrainer(ipu_config=config, args=make_args(tmp_path), model_init=model_init,
                   optimizers=(None, functools.partial(schedule)))


def test_compile_only_in_train_compiles_and_stops(tmp_path, monkeypatch):
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.append(module) or module)
    trainer = IPUTrainer(model=model, ipu_config=IPUConfig(), args=make_args(tmp_path, compile_only=True),
                         data_collator=default_data_collator, train_dataset=masked_pairs(8))
    result = trainer.train()
    assert isinstance(result, TrainOutput) and result.global_step == 0 and "compile_seconds" in result.metrics
    assert compiled == [model] and trainer.state.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- the masking collator and batch-axis padding ------------------------------------------------------------


def test_the_collator_takes_max_seq_length_first(tokenizer):
    collator = DataCollatorForLanguageModelingWithMaxTokensMasked(128, tokenizer=tokenizer, mlm_probability=0.15)
    assert (collator.max_seq_length, collator.max_num_masked_tokens) == (128, 32)
    collator = DataCollatorForLanguageModelingWithMaxTokensMasked(512, tokenizer)
    assert (collator.tokenizer, collator.max_num_masked_tokens) == (tokenizer, 96)
    # This project's keyword use and the upstream order (tokenizer first) keep working.
    collator = DataCollatorForLanguageModelingWithMaxTokensMasked(
        tokenizer=tokenizer, mlm_probability=0.15, max_seq_length=384, max_num_masked_tokens=50, seed=1)
    assert (collator.max_seq_length, collator.max_num_masked_tokens) == (384, 50)
    assert DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, max_seq_length=384).max_num_masked_tokens == 80
    with pytest.raises(TypeError, match="max_seq_length both positionally and as a keyword"):
        DataCollatorForLanguageModelingWithMaxTokensMasked(128, tokenizer=tokenizer, max_seq_length=128)


def test_pad_on_batch_axis_forms():
    examples = [{"input_ids": [i, i], "labels": i} for i in range(3)]
    padded = pad_on_batch_axis(5)(default_data_collator)  # optimum-graphcore's decorator form
    assert padded(examples)["labels"].tolist() == [0, 1, 2, 0, 1]
    assert pad_on_batch_axis(5, default_data_collator)(examples)["labels"].shape == (5,)
    # The pretraining example's call with pad values: the trainer pads, the collator is returned as it is.
    assert pad_on_batch_axis(5, {"labels": -100, "input_ids": 0})(default_data_collator) is default_data_collator


# ---- scripts written in the original's style train and evaluate offline -------------------------------------

TINY_BERT = "vocab_size=2000,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,max_position_embeddings=64"
TINY_GPT2 = "vocab_size=2000,n_embd=32,n_layer=2,n_head=2,n_positions=64"
COMMON = ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_steps", "3",
          "--learning_rate", "1e-3", "--report_to", "none", "--disable_tqdm", "true", "--seed", "3", "--fp32",
          "--do_train", "--do_eval"]


def run_original_style(script, monkeypatch, argv):
    import runpy

    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(os.path.join(ORIGINAL_STYLE, script), run_name="__main__")


def results(output_dir):
    with open(os.path.join(output_dir, "all_results.json")) as f:
        return json.load(f)


def write_ipu_config_of_0_7(folder, **values):
    """An ipu_config.json as optimum-graphcore 0.7's save_pretrained wrote it (every field, its bookkeeping keys)."""
    data = {
        "auto_loss_scaling": False, "device_iterations": 1, "embedding_serialization_factor": 1,
        "enable_half_partials": True, "executable_cache_dir": "", "execute_encoder_on_cpu_for_generation": False,
        "explicit_ir_inference": False, "gradient_accumulation_steps": 2, "inference_device_iterations": 2,
        "inference_embedding_serialization_factor": 1, "inference_ipus_per_replica": 1,
        "inference_layers_per_ipu": [-1], "inference_matmul_proportion": 0.2,
        "inference_parallelize_kwargs": {}, "inference_projection_serialization_factor": 1,
        "inference_replication_factor": 1, "inference_serialized_embedding_splits_per_ipu": None,
        "inference_serialized_projection_splits_per_ipu": None, "ipus_per_replica": 1, "layers_per_ipu": [-1],
        "matmul_proportion": 0.2, "optimizer_state_offchip": False, "optimum_version": "1.6.1", "output_mode": "final",
        "parallelize_kwargs": {}, "projection_serialization_factor": 1, "recompute_checkpoint_every_layer": False,
        "replicated_tensor_sharding": False, "replication_factor": 1, "seed": None,
        "serialized_embedding_splits_per_ipu": None, "serialized_projection_splits_per_ipu": None,
        "transformers_version": "4.29.2", **values,
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "ipu_config.json"), "w") as f:
        json.dump(data, f)
    return str(folder)


def test_original_style_run_mlm_fine_tunes_a_checkpoint(assets, tmp_path, monkeypatch):
    checkpoint = tmp_path / "checkpoint"
    BertForMaskedLM(BertConfig(vocab_size=2000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(checkpoint)
    write_ipu_config_of_0_7(checkpoint)  # found through --model_name_or_path, as the original looked for it
    out = tmp_path / "mlm"
    run_original_style("run_mlm.py", monkeypatch, [
        "--model_name_or_path", str(checkpoint), "--tokenizer_name", assets["tokenizer"],
        "--train_file", assets["train_file"], "--validation_file", assets["validation_file"], "--max_seq_length", "64",
        "--max_eval_samples", "8", "--output_dir", str(out), "--n_ipu", "2", *COMMON,
    ])
    metrics = results(out)
    assert metrics["train_samples"] > 0 and metrics["eval_samples"] == 8
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-5)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    saved = IPUConfig.from_pretrained(str(out))
    # --n_ipu 2 over a 1-IPU pipeline: 2 replicas; the file's accumulation 2: 4 x 2 x 2 = 16 samples a step.
    assert (saved.replication_factor, saved.inference_replication_factor, saved.gradient_accumulation_steps) == (2, 2, 2)
    assert (out / "README.md").is_file()


def test_original_style_run_clm(assets, tmp_path, monkeypatch):
    out = tmp_path / "clm"
    run_original_style("run_clm.py", monkeypatch, [
        "--model_type", "gpt2", "--config_overrides", TINY_GPT2, "--tokenizer_name", assets["tokenizer"],
        "--train_file", assets["train_file"], "--validation_file", assets["validation_file"], "--block_size", "32",
        "--max_train_samples", "64", "--max_eval_samples", "8", "--output_dir", str(out),
        "--ipu_config_name", write_ipu_config_of_0_7(tmp_path / "ipu"), *COMMON,
    ])
    metrics = results(out)
    assert metrics["eval_samples"] == 8 and metrics["perplexity"] > 1
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3


def test_original_style_run_pretraining_with_its_schedule_and_padding(assets, tokenizer, tmp_path, monkeypatch):
    from ipu_trainer.data.nsp_pairs import build_nsp_pairs, load_text_documents

    documents = load_text_documents({"train": assets["train_file"]})["train"].select(range(40))
    build_nsp_pairs(documents, tokenizer, 64, seed=0).save_to_disk(str(tmp_path / "pairs"))
    out = tmp_path / "pretraining"
    run_original_style("run_pretraining.py", monkeypatch, [
        "--model_type", "bert", "--config_overrides", TINY_BERT, "--tokenizer_name", assets["tokenizer"],
        "--dataset_path", str(tmp_path / "pairs"), "--is_already_preprocessed", "--validation_split_percentage", "10",
        "--ipu_config_name", REPO, "--ipu_config_overrides",
        "layers_per_ipu=[-1],ipus_per_replica=1,replication_factor=1,gradient_accumulation_steps=1",
        "--groupbert_schedule", "--warmup_ratio", "0.5", "--lamb", "--pad_on_batch_axis", "--logging_steps", "1",
        "--output_dir", str(out), *COMMON,
    ])
    metrics = results(out)
    assert metrics["eval_loss"] > 0 and metrics["train_samples"] > 0
    state = json.loads((out / "trainer_state.json").read_text())
    rates = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    # The script's own square-root warmup over ceil(3 x 0.5) = 2 steps, from its functools.partial.
    assert rates[:2] == pytest.approx([0.0, 1e-3 * 0.5**0.5])


def test_the_scripts_load_the_pod_entries_of_their_ipu_config(tmp_path):
    from ipu_trainer.cli.model_loading import load_ipu_config

    (tmp_path / "ipu").mkdir()
    (tmp_path / "ipu" / "ipu_config.json").write_text(json.dumps({"device_iterations": {"pod16": 2, "default": 1}}))
    args = make_args(tmp_path, ipu_config_name=str(tmp_path / "ipu"), pod_type="pod16")
    assert load_ipu_config(args, None).device_iterations == 2
    assert load_ipu_config(make_args(tmp_path, ipu_config_name=str(tmp_path / "ipu")), None).device_iterations == 1
