import json
import logging
from pathlib import Path

import pytest

from conftest import REPO, cache_hub_file
from ipu_trainer.config.ipu_config import (
    FIELDS,
    IncompatibleIPUConfigError,
    IPUConfig,
    field_table,
    locate_config_file,
)

# The ipu_config.json of the original examples, shipped next to the scripts.
SEED_CONFIG = {
    "async_dataloader": True,
    "embedding_serialization_factor": 1,
    "recompute_checkpoint_every_layer": True,
    "optimizer_state_offchip": True,
    "replicated_tensor_sharding": True,
    "enable_half_first_order_momentum": False,
    "enable_half_partials": True,
    "replication_factor": 4,
    "gradient_accumulation_steps": 512,
    "device_iterations": 1,
    "executable_cache_dir": "./exe_cache",
    "ipus_per_replica": 4,
    "layers_per_ipu": [0, 4, 4, 4],
    "matmul_proportion": [0.25],
}


@pytest.fixture
def seed_dir(tmp_path):
    (tmp_path / "ipu_config.json").write_text(json.dumps(SEED_CONFIG))
    return tmp_path


def test_the_readme_field_table_is_the_one_the_fields_document():
    """README's table of what each field does is field_table()'s output: it cannot drift from FIELDS."""
    with open(f"{REPO}/README.md") as readme:
        text = readme.read()
    heading = "## What each `ipu_config.json` field does here\n\n"
    start = text.index(heading) + len(heading)
    # The whole table, up to the blank line after it: a row added, dropped or edited in the README fails.
    end = text.index("\n\n", start) + 1
    assert text[start:end] == field_table(), "regenerate it: print(field_table())"


def test_every_field_is_documented_with_its_evaluation_twin():
    names = {field.name for field in FIELDS}
    assert len(names) == len(FIELDS)
    for field in FIELDS:
        if field.twin_of in names:
            assert not (field.on_ipu or field.here), f"{field.name} is documented with {field.twin_of}"
        else:
            assert field.on_ipu and field.here, f"{field.name} has no documentation"
    # A fresh config holds every field at its default.
    config = IPUConfig()
    assert sorted(config.to_dict()) == sorted(names)


def test_per_mode_fields_read_the_training_field_or_its_inference_twin():
    per_mode = [field.name for field in FIELDS if field.per_mode]
    assert "layers_per_ipu" in per_mode and "replication_factor" not in per_mode
    config = IPUConfig(layers_per_ipu=[1, 2], inference_layers_per_ipu=[3], parallelize_kwargs={"a": 1})
    for name in per_mode:
        assert f"inference_{name}" in {field.name for field in FIELDS}, f"{name} has no inference_ twin"
        assert getattr(config, f"_{name}") == getattr(config, name)
        config.eval()
        assert getattr(config, f"_{name}") == getattr(config, f"inference_{name}")
        config.train()
    config.eval()
    config._layers_per_ipu = [4, 4]
    assert config.inference_layers_per_ipu == [4, 4] and config.layers_per_ipu == [1, 2]


def test_seed_config_loads_from_folder_and_file(seed_dir):
    from_folder = IPUConfig.from_pretrained(str(seed_dir))
    from_file = IPUConfig.from_pretrained(str(seed_dir / "ipu_config.json"))
    assert from_folder == from_file
    assert from_folder.unknown_keys == []
    assert from_folder.replication_factor == 4
    assert from_folder.gradient_accumulation_steps == 512
    assert from_folder.ipus_per_replica == 4
    assert from_folder.layers_per_ipu == [0, 4, 4, 4]
    assert from_folder.matmul_proportion == [0.25]
    assert from_folder.async_dataloader is True
    assert from_folder.resolved_layers_per_ipu(12) == [0, 4, 4, 4]
    assert from_folder.batch_size_factor() == 4 * 512


def test_extra_and_repeated_keys_are_kept_and_reported(tmp_path, caplog):
    text = (
        '{"replication_factor": 2, "optimizer": "lamb", "learning_rate": 0.006, '
        '"layer_norm_eps": 0.001, "dataloader_workers": 64, "replication_factor": 8}'
    )
    path = tmp_path / "old.json"
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="ipu_trainer.config.ipu_config"):
        config = IPUConfig.from_pretrained(str(path))
    assert config.replication_factor == 8  # last value wins
    assert config.unknown_keys == ["optimizer", "learning_rate", "layer_norm_eps", "dataloader_workers"]
    assert config.optimizer == "lamb"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "optimizer" in warnings[0].getMessage() and "dataloader_workers" in warnings[0].getMessage()
    # Kept keys survive a save/load round trip.
    reloaded = IPUConfig.from_pretrained(str(config.save_pretrained(tmp_path / "out")))
    assert reloaded.to_dict()["learning_rate"] == 0.006
    assert reloaded == config


def test_unknown_key_named_like_a_method_does_not_shadow_it():
    config = IPUConfig(get="x", validate=1)
    assert config.to_dict()["get"] == "x"
    assert config.get("replication_factor") == 1
    config.validate()


def test_pod_typed_values(tmp_path):
    path = tmp_path / "ipu_config.json"
    pod_table = {"pod4": 1, "pod8": 2, "pod16": 4, "pod32": 8, "pod64": 16, "default": 1}
    path.write_text(json.dumps({"replication_factor": pod_table, "device_iterations": {"pod16": 2, "default": 3}}))
    assert IPUConfig.from_pretrained(str(path)).replication_factor == 1
    pod16 = IPUConfig.from_pretrained(str(path), pod_type="pod16")
    assert (pod16.replication_factor, pod16.device_iterations) == (4, 2)
    with pytest.raises(ValueError, match=r"device_iterations .*pod_type='pod64'.*available: pod16, default"):
        IPUConfig.from_pretrained(str(path), pod_type="pod64")
    with pytest.raises(ValueError, match=r"replication_factor .*without a 'default' entry"):
        IPUConfig(replication_factor={"pod16": 4})
    # parallelize_kwargs is a real dict, not a POD table.
    assert IPUConfig(parallelize_kwargs={"default": 1}).parallelize_kwargs == {"default": 1}


def test_save_load_round_trip(tmp_path):
    config = IPUConfig(
        replication_factor=2,
        layers_per_ipu=[1, -1],
        inference_layers_per_ipu=[-1],
        matmul_proportion=[0.1, 0.3],
        serialized_embedding_splits_per_ipu=[3, 2],  # one entry per IPU of the 2-IPU pipeline
        seed=7,
        parallelize_kwargs={"use_cache": True},
    )
    path = config.save_pretrained(tmp_path / "new" / "folder")
    assert path == tmp_path / "new" / "folder" / "ipu_config.json"
    assert json.loads(path.read_text()) == config.to_dict()
    assert config.to_json_string() == json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    reloaded = IPUConfig.from_pretrained(str(tmp_path / "new" / "folder"))
    assert reloaded == config
    assert reloaded != IPUConfig()
    assert "replication_factor" in repr(reloaded)


def test_from_pretrained_overrides_and_missing_files(seed_dir, tmp_path):
    config = IPUConfig.from_pretrained(str(seed_dir), device_iterations=3)
    assert config.device_iterations == 3
    with pytest.raises(ValueError, match="`device_iterations` must be >= 1. You provided device_iterations=0"):
        IPUConfig.from_pretrained(str(seed_dir), device_iterations=0)
    with pytest.raises(ValueError, match="unknown IPU config key 'bogus'"):
        IPUConfig.from_pretrained(str(seed_dir), bogus=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no ipu_config.json in folder"):
        IPUConfig.from_pretrained(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="file not found"):
        IPUConfig.from_pretrained(str(tmp_path / "missing.json"))


def test_malformed_json_names_file_and_position(tmp_path):
    path = tmp_path / "ipu_config.json"
    path.write_text('{\n  "replication_factor": 4,\n  "device_iterations": \n}')
    with pytest.raises(ValueError, match=r"ipu_config\.json is not valid JSON: .* line 4 column 1"):
        IPUConfig.from_pretrained(str(tmp_path))


def test_update_from_string_parses_types():
    config = IPUConfig()
    config.update_from_string(
        "device_iterations=2,matmul_proportion=[0.14 0.19 0.19 0.19],layers_per_ipu=[1 3 4 4],"
        "enable_half_partials=FALSE,recompute_checkpoint_every_layer=true,seed=None,"
        "executable_cache_dir=./exe_cache,output_mode=sum"
    )
    assert config.device_iterations == 2
    assert config.matmul_proportion == [0.14, 0.19, 0.19, 0.19]
    assert config.layers_per_ipu == [1, 3, 4, 4]
    assert config.ipus_per_replica == 4  # follows layers_per_ipu
    assert config.enable_half_partials is False
    assert config.recompute_checkpoint_every_layer is True
    assert config.seed is None
    assert config.executable_cache_dir == "./exe_cache"
    assert config.output_mode == "sum"
    config.update_from_string("matmul_proportion=0.22,layers_per_ipu=[-1],embedding_serialization_factor=2")
    assert config.matmul_proportion == 0.22 and isinstance(config.matmul_proportion, float)
    assert config.layers_per_ipu == [-1]
    assert config.embedding_serialization_factor == 2
    config.update_from_string("matmul_proportion=1")
    assert isinstance(config.matmul_proportion, float)
    config.update_from_string("inference_matmul_proportion=[0.1, 0.2],inference_device_iterations=5")
    assert config.inference_matmul_proportion == [0.1, 0.2]
    assert config.inference_device_iterations == 5
    # A key kept from the file may be overridden; its current value's type guides parsing.
    kept = IPUConfig(learning_rate=0.006)
    kept.update_from_string("learning_rate=1")
    assert kept.learning_rate == 1.0 and isinstance(kept.learning_rate, float)


def test_update_from_string_rejects_bad_input_atomically():
    config = IPUConfig()
    unknown = r"unknown IPU config key 'foo' in override 'foo=1'; valid keys: .*replication_factor"
    with pytest.raises(ValueError, match=unknown):
        config.update_from_string("device_iterations=4,foo=1")
    with pytest.raises(ValueError, match=r"`replication_factor` must be >= 1. You provided replication_factor=-2"):
        config.update_from_string("device_iterations=4,replication_factor=-2")
    assert config.device_iterations == 1  # nothing applied from a failing string
    with pytest.raises(TypeError, match="must be an integer. You provided gradient_accumulation_steps=2.5"):
        config.update_from_string("gradient_accumulation_steps=2.5")
    with pytest.raises(ValueError, match="malformed IPU config override 'device_iterations'"):
        config.update_from_string("device_iterations")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("replication_factor", -2, r"`replication_factor` must be >= 1. You provided replication_factor=-2"),
        ("replication_factor", True, r"`replication_factor` must be an integer. You provided replication_factor=True"),
        ("gradient_accumulation_steps", 2.5, r"gradient_accumulation_steps=2.5 \(float\)"),
        ("ipus_per_replica", 0, r"`ipus_per_replica` must be >= 1. You provided ipus_per_replica=0"),
        ("embedding_serialization_factor", 0, r"embedding_serialization_factor=0"),
        ("inference_device_iterations", 0, r"inference_device_iterations=0"),
        ("matmul_proportion", -0.1, r"`matmul_proportion` must be >= 0. You provided matmul_proportion=-0.1"),
        ("matmul_proportion", [0.2, -0.1], r"must have all elements >= 0. You provided matmul_proportion=\[0.2, -0.1\]"),
        ("layers_per_ipu", [1, -2], r"must have all elements >= -1. You provided layers_per_ipu=\[1, -2\]"),
        ("serialized_embedding_splits_per_ipu", [3, 0, 2, 0],
         r"splits_per_ipu=\[3, 0, 2, 0\]` must have its splits on consecutive IPUs"),
        ("serialized_projection_splits_per_ipu", [0, 0],
         r"serialized_projection_splits_per_ipu=\[0, 0\]` must have atleast 1 split"),
        ("serialized_projection_splits_per_ipu", [1, -1], r"serialized_projection_splits_per_ipu=\[1, -1\]"),
        ("output_mode", "bogus", r"`output_mode` can only take values in .*You provided output_mode='bogus'"),
        ("enable_half_partials", "yes", r"`enable_half_partials` must be true or false. You provided enable_half_partials='yes'"),
    ],
)
def test_field_validators(field, value, message):
    with pytest.raises(ValueError, match=message) as info:
        IPUConfig(**{field: value})
    assert "\n" not in str(info.value)
    # Assignment is checked too (the original's semantics), and a refused value leaves the field alone.
    config = IPUConfig()
    before = config.to_dict()
    with pytest.raises(ValueError, match=message):
        setattr(config, field, value)
    assert config.to_dict() == before


def test_type_errors_are_type_errors_and_value_errors():
    with pytest.raises(TypeError):
        IPUConfig(device_iterations={"a": 1})
    with pytest.raises(ValueError):
        IPUConfig(device_iterations={"a": 1})


def test_valid_edge_values_and_coercion():
    config = IPUConfig(
        serialized_embedding_splits_per_ipu=[0, 3, 2, 0],
        layers_per_ipu=[-1, -1, -1, -1],
        replication_factor=2.0,
        matmul_proportion=0,
        projection_serialization_factor=None,
    )
    assert config.replication_factor == 2 and isinstance(config.replication_factor, int)
    assert config.matmul_proportion == 0.0
    assert config.projection_serialization_factor == 1  # null: not serialized
    assert config.embedding_serialization_factor is None  # the splits decide


def test_batch_size_factor():
    config = IPUConfig(
        replication_factor=4, gradient_accumulation_steps=16, device_iterations=2,
        inference_replication_factor=2, inference_device_iterations=5,
    )
    assert config.batch_size_factor() == 4 * 16 * 2
    assert config.batch_size_factor(for_inference=True) == 2 * 5


def test_get_falls_back_to_training_value():
    config = IPUConfig(layers_per_ipu=[0, 4, 4, 4], matmul_proportion=0.3, inference_matmul_proportion=0.1)
    assert config.get("layers_per_ipu", True) == [0, 4, 4, 4]
    assert config.get("matmul_proportion") == 0.3
    assert config.get("matmul_proportion", for_inference=True) == 0.1
    assert config.get("ipus_per_replica", True) == 4
    config.update_from_string("inference_layers_per_ipu=[-1]")
    assert config.get("layers_per_ipu", True) == [-1]
    assert config.get("ipus_per_replica", True) == 1
    assert config.resolved_layers_per_ipu(12, for_inference=True) == [12]


@pytest.mark.parametrize(
    "layers, expected",
    [
        ([-1], [12]),
        ([0, -1, -1, -1], [0, 4, 4, 4]),
        ([1, -1, -1], [1, 5, 6]),  # the remainder goes to the last wildcard, as in the original
        ([-1, -1, -1], [4, 4, 4]),
        ([0, 4, 4, 4], [0, 4, 4, 4]),
        ([-1, -1, 12], [0, 0, 12]),
    ],
)
def test_layer_wildcards(layers, expected):
    assert IPUConfig(layers_per_ipu=layers).resolved_layers_per_ipu(12) == expected


def test_incompatible_layers():
    too_few = r"layers_per_ipu=\[1, 2\] places 3 layers but the model has 12 \(num_hidden_layers\)"
    with pytest.raises(IncompatibleIPUConfigError, match=too_few):
        IPUConfig(layers_per_ipu=[1, 2]).resolved_layers_per_ipu(12)
    # A pipeline length that contradicts ipus_per_replica is refused when the config is built (the original's
    # semantics), and by validate() after an override.
    mismatch = r"layers_per_ipu=\[0, 4, 4, 4\] should use the same number of IPUs as ipus_per_replica=2"
    with pytest.raises(IncompatibleIPUConfigError, match=mismatch):
        IPUConfig(layers_per_ipu=[0, 4, 4, 4], ipus_per_replica=2)
    config = IPUConfig(ipus_per_replica=2)
    config.update_from_string("layers_per_ipu=[0 4 4 4]")
    with pytest.raises(IncompatibleIPUConfigError, match=mismatch):
        config.validate()
    with pytest.raises(IncompatibleIPUConfigError, match=r"fixes 16 layers .* the model has 12"):
        IPUConfig(layers_per_ipu=[8, 8, -1]).resolved_layers_per_ipu(12)
    assert issubclass(IncompatibleIPUConfigError, ValueError)


def test_apply_n_ipu(seed_dir):
    config = IPUConfig.from_pretrained(str(seed_dir))
    config.apply_n_ipu(16)
    assert (config.replication_factor, config.inference_replication_factor) == (4, 4)
    config.inference_ipus_per_replica = 1
    config.apply_n_ipu(8)
    assert (config.replication_factor, config.inference_replication_factor) == (2, 8)
    with pytest.raises(ValueError, match="n_ipu=12 is invalid: must be one of 1, 2, 4, 8, 16, 32, 64"):
        config.apply_n_ipu(12)
    with pytest.raises(IncompatibleIPUConfigError, match="n_ipu=2 is not a multiple of ipus_per_replica=4"):
        config.apply_n_ipu(2)
    assert config.replication_factor == 2  # unchanged by the failed call


def test_ipu_only_settings(seed_dir):
    assert IPUConfig().ipu_only_settings() == {}
    settings = IPUConfig.from_pretrained(str(seed_dir)).ipu_only_settings()
    assert settings["layers_per_ipu"] == [0, 4, 4, 4]
    assert settings["matmul_proportion"] == [0.25]
    assert settings["async_dataloader"] is True
    assert settings["enable_half_partials"] is True  # named in the file, even at its default
    assert "gradient_accumulation_steps" not in settings
    assert "recompute_checkpoint_every_layer" not in settings
    assert "executable_cache_dir" not in settings  # the trainer reuses it as the compile cache


# ---- where the file is: one locator for folders, files and hub ids -------------------------------------------


def test_the_locator_finds_a_folders_file_a_json_file_or_a_cached_hub_file(tmp_path):
    config = IPUConfig(layers_per_ipu=[1, 2], device_iterations=4)
    folder_file = config.save_pretrained(tmp_path / "folder")
    assert locate_config_file(tmp_path / "folder") == folder_file
    assert locate_config_file(str(folder_file)) == folder_file
    config.save_pretrained(tmp_path / "repo" / "sub")
    assert locate_config_file(tmp_path / "repo", subfolder="sub") == tmp_path / "repo" / "sub" / "ipu_config.json"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no ipu_config.json in folder"):
        locate_config_file(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="IPU config file not found: ./missing.json"):
        locate_config_file("./missing.json")
    cached = cache_hub_file(tmp_path / "cache", "someone/ipu", "ipu_config.json", config.to_json_string())
    assert locate_config_file("someone/ipu", cache_dir=str(tmp_path / "cache"), local_files_only=True) == Path(cached)
    assert IPUConfig.from_pretrained("someone/ipu", cache_dir=str(tmp_path / "cache"), local_files_only=True) == config
    with pytest.raises(OSError, match="could not download ipu_config.json from the hub repo 'someone/other'"):
        locate_config_file("someone/other", cache_dir=str(tmp_path / "cache"), local_files_only=True)


def test_a_json_file_is_read_with_the_pod_types_entries(tmp_path):
    path = tmp_path / "ipu.json"
    path.write_text(json.dumps({"layers_per_ipu": [-1], "device_iterations": {"default": 1, "pod16": 8}}))
    assert IPUConfig.from_json_file(path, pod_type="pod16").device_iterations == 8
    assert IPUConfig.from_json_file(path).device_iterations == 1
