"""The `ipu_config.json` of the IPU examples, readable and checked on any device.

An `IPUConfig` holds the settings the Graphcore examples kept next to the model config: replication,
gradient accumulation, device iterations, pipeline placement (`layers_per_ipu`) and a number of
compiler options. Files written for IPUs load unchanged: keys this class does not know are kept and
written back, POD-typed values (`{"pod16": 4, "default": 1}`) are resolved, and every value goes
through a validator whose error names the field and the value.

Fields with an `inference_` twin use the twin when evaluating; a twin left at None means "same as
training", except `inference_replication_factor` and `inference_device_iterations`, which are real
values (default 1) as in the original.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable

from huggingface_hub import hf_hub_download

logger = logging.getLogger(__name__)

CONFIG_NAME = "ipu_config.json"
VALID_N_IPU = (1, 2, 4, 8, 16, 32, 64)
OUTPUT_MODES = ("all", "sum", "final", "default")

# Settings that steer the Poplar compiler or the placement of layers on IPUs. Off-IPU they change
# nothing, so the trainer names them once in its log instead of silently ignoring them. The README
# lists the same names; keep the two in sync. executable_cache_dir is not here: the trainer reuses it
# as the torch.compile cache.
IPU_ONLY_SETTINGS: tuple[str, ...] = (
    "layers_per_ipu",
    "inference_layers_per_ipu",
    "ipus_per_replica",
    "inference_ipus_per_replica",
    "matmul_proportion",
    "inference_matmul_proportion",
    "enable_half_partials",
    "serialized_embedding_splits_per_ipu",
    "inference_serialized_embedding_splits_per_ipu",
    "serialized_projection_splits_per_ipu",
    "inference_serialized_projection_splits_per_ipu",
    "optimizer_state_offchip",
    "replicated_tensor_sharding",
    "output_mode",
    "async_dataloader",
    "enable_half_first_order_momentum",
    "parallelize_kwargs",
    "inference_parallelize_kwargs",
)

_DEFAULTS: dict[str, Any] = {
    # Batch shape: one host step sees micro * replication * accumulation * device_iterations samples.
    "replication_factor": 1,
    "inference_replication_factor": 1,
    "gradient_accumulation_steps": 1,
    "device_iterations": 1,
    "inference_device_iterations": 1,
    # Pipeline placement; ipus_per_replica=None follows len(layers_per_ipu).
    "layers_per_ipu": [-1],
    "inference_layers_per_ipu": None,
    "ipus_per_replica": None,
    "inference_ipus_per_replica": None,
    # Vocabulary embedding / projection split into chunks (None in old files means 1).
    "embedding_serialization_factor": 1,
    "inference_embedding_serialization_factor": None,
    "projection_serialization_factor": 1,
    "inference_projection_serialization_factor": None,
    "serialized_embedding_splits_per_ipu": None,
    "inference_serialized_embedding_splits_per_ipu": None,
    "serialized_projection_splits_per_ipu": None,
    "inference_serialized_projection_splits_per_ipu": None,
    # Memory and numerics.
    "recompute_checkpoint_every_layer": False,
    "optimizer_state_offchip": False,
    "replicated_tensor_sharding": False,
    "matmul_proportion": 0.2,
    "inference_matmul_proportion": None,
    "enable_half_partials": True,
    "enable_half_first_order_momentum": False,
    "auto_loss_scaling": False,
    # Runtime.
    "output_mode": "final",
    "seed": None,
    "executable_cache_dir": "",
    "async_dataloader": False,
    "parallelize_kwargs": None,
    "inference_parallelize_kwargs": None,
}

# Fields whose value is legitimately a dict, so a dict there is not a per-POD-type table.
_DICT_FIELDS = frozenset({"parallelize_kwargs", "inference_parallelize_kwargs"})
# Fields read through a property that fills in None from layers_per_ipu.
_DERIVED_FIELDS = frozenset({"ipus_per_replica", "inference_ipus_per_replica"})


class IncompatibleIPUConfigError(ValueError):
    """The IPU config contradicts itself or the model (layer counts, IPU counts)."""


# Validators ------------------------------------------------------------------------------------
# Each takes (field name, value) and returns the value to store, raising a one-line ValueError
# that shows `name=value`.

Validator = Callable[[str, Any], Any]


def _invalid(name: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid: {rule}")


def _to_int(value: Any) -> Any:
    """2.0 read from JSON is the integer 2; 2.5 and True are left alone to be rejected."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _int_at_least(minimum: int, optional: bool = False) -> Validator:
    def check(name: str, value: Any) -> Any:
        if value is None and optional:
            return None
        value = _to_int(value)
        if not _is_int(value) or value < minimum:
            raise _invalid(name, value, f"must be an integer >= {minimum}")
        return value

    return check


def _serialization_factor(name: str, value: Any) -> int:
    # Old files write null for "not serialized".
    return 1 if value is None else _int_at_least(1)(name, value)


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _invalid(name, value, "must be true or false")
    return value


def _optional_int(name: str, value: Any) -> int | None:
    value = _to_int(value)
    if value is not None and not _is_int(value):
        raise _invalid(name, value, "must be an integer or null")
    return value


def _matmul_proportion(optional: bool) -> Validator:
    def check(name: str, value: Any) -> float | list[float] | None:
        if value is None and optional:
            return None
        entries = value if isinstance(value, (list, tuple)) else [value]
        if not entries or not all(_is_number(v) and v >= 0 for v in entries):
            raise _invalid(name, value, "must be a number >= 0 or a non-empty list of them (one per IPU)")
        floats = [float(v) for v in entries]
        return floats if isinstance(value, (list, tuple)) else floats[0]

    return check


def _int_list(name: str, value: Any, minimum: int, rule: str) -> list[int]:
    entries = [_to_int(v) for v in value] if isinstance(value, (list, tuple)) else None
    if not entries or not all(_is_int(v) and v >= minimum for v in entries):
        raise _invalid(name, value, rule)
    return entries


def _layers_per_ipu(optional: bool) -> Validator:
    def check(name: str, value: Any) -> list[int] | None:
        if value is None and optional:
            return None
        rule = "must be a non-empty list of integers >= -1 (-1 shares the remaining layers)"
        return _int_list(name, value, -1, rule)

    return check


def _splits_per_ipu(name: str, value: Any) -> list[int] | None:
    if value is None:
        return None
    rule = "must be a list of integers >= 0 with sum >= 1, non-zero on consecutive IPUs only"
    entries = _int_list(name, value, 0, rule)
    used = [i for i, v in enumerate(entries) if v]
    if not used or used != list(range(used[0], used[-1] + 1)):
        raise _invalid(name, value, rule)
    return entries


def _output_mode(name: str, value: Any) -> str:
    if value not in OUTPUT_MODES:
        raise _invalid(name, value, f"must be one of {', '.join(OUTPUT_MODES)}")
    return value


def _string(name: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _invalid(name, value, "must be a string")
    return value


def _optional_dict(name: str, value: Any) -> dict | None:
    if value is not None and not isinstance(value, dict):
        raise _invalid(name, value, "must be a JSON object or null")
    return copy.deepcopy(value)


_VALIDATORS: dict[str, Validator] = {
    "replication_factor": _int_at_least(1),
    "inference_replication_factor": _int_at_least(1),
    "gradient_accumulation_steps": _int_at_least(1),
    "device_iterations": _int_at_least(1),
    "inference_device_iterations": _int_at_least(1),
    "layers_per_ipu": _layers_per_ipu(optional=False),
    "inference_layers_per_ipu": _layers_per_ipu(optional=True),
    "ipus_per_replica": _int_at_least(1, optional=True),
    "inference_ipus_per_replica": _int_at_least(1, optional=True),
    "embedding_serialization_factor": _serialization_factor,
    "inference_embedding_serialization_factor": _int_at_least(1, optional=True),
    "projection_serialization_factor": _serialization_factor,
    "inference_projection_serialization_factor": _int_at_least(1, optional=True),
    "serialized_embedding_splits_per_ipu": _splits_per_ipu,
    "inference_serialized_embedding_splits_per_ipu": _splits_per_ipu,
    "serialized_projection_splits_per_ipu": _splits_per_ipu,
    "inference_serialized_projection_splits_per_ipu": _splits_per_ipu,
    "recompute_checkpoint_every_layer": _boolean,
    "optimizer_state_offchip": _boolean,
    "replicated_tensor_sharding": _boolean,
    "matmul_proportion": _matmul_proportion(optional=False),
    "inference_matmul_proportion": _matmul_proportion(optional=True),
    "enable_half_partials": _boolean,
    "enable_half_first_order_momentum": _boolean,
    "auto_loss_scaling": _boolean,
    "output_mode": _output_mode,
    "seed": _optional_int,
    "executable_cache_dir": _string,
    "async_dataloader": _boolean,
    "parallelize_kwargs": _optional_dict,
    "inference_parallelize_kwargs": _optional_dict,
}


def _resolve_pod_type(name: str, value: Any, pod_type: str | None) -> Any:
    """Pick the entry of a per-POD-type table such as {"pod16": 4, "default": 1}."""
    if not isinstance(value, dict) or name in _DICT_FIELDS:
        return value
    if pod_type is not None:
        if pod_type not in value:
            raise ValueError(
                f"{name} is given per POD type but has no entry for pod_type={pod_type!r}; "
                f"available: {', '.join(map(str, value))}"
            )
        return value[pod_type]
    if "default" not in value:
        raise ValueError(
            f"{name} is given per POD type ({', '.join(map(str, value))}) without a 'default' entry; "
            "choose one with pod_type=..."
        )
    return value["default"]


# Override strings ------------------------------------------------------------------------------

# Commas separate overrides except inside [...], so "a=[1, 2],b=3" also works.
_OVERRIDE_SPLIT = re.compile(r",(?![^\[]*\])")


def _parse_scalar(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def _parse_value(text: str, like: Any) -> Any:
    """Parse one override value; `like` (the current or default value) settles ambiguities."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return [_parse_scalar(t) for t in re.split(r"[\s,]+", text[1:-1].strip()) if t]
    if isinstance(like, str):
        # A path or mode stays text even when it looks like a number.
        return text
    value = _parse_scalar(text)
    if isinstance(like, float) and _is_int(value):
        return float(value)
    return value


class IPUConfig:
    """IPU execution settings; see the module docstring for the file format it reads."""

    replication_factor: int
    inference_replication_factor: int
    gradient_accumulation_steps: int
    device_iterations: int
    inference_device_iterations: int
    layers_per_ipu: list[int]
    inference_layers_per_ipu: list[int] | None
    embedding_serialization_factor: int
    inference_embedding_serialization_factor: int | None
    projection_serialization_factor: int
    inference_projection_serialization_factor: int | None
    serialized_embedding_splits_per_ipu: list[int] | None
    inference_serialized_embedding_splits_per_ipu: list[int] | None
    serialized_projection_splits_per_ipu: list[int] | None
    inference_serialized_projection_splits_per_ipu: list[int] | None
    recompute_checkpoint_every_layer: bool
    optimizer_state_offchip: bool
    replicated_tensor_sharding: bool
    matmul_proportion: float | list[float]
    inference_matmul_proportion: float | list[float] | None
    enable_half_partials: bool
    enable_half_first_order_momentum: bool
    auto_loss_scaling: bool
    output_mode: str
    seed: int | None
    executable_cache_dir: str
    async_dataloader: bool
    parallelize_kwargs: dict[str, Any] | None
    inference_parallelize_kwargs: dict[str, Any] | None

    def __init__(self, pod_type: str | None = None, **kwargs: Any) -> None:
        self._unknown: dict[str, Any] = {}
        # Fields named in the file or an override, reported by ipu_only_settings() even at default.
        self._given: set[str] = set()
        for name, default in _DEFAULTS.items():
            setattr(self, name, copy.deepcopy(default))
        for name, value in kwargs.items():
            value = _resolve_pod_type(name, value, pod_type) if name in _DEFAULTS else value
            self._set(name, value, allow_unknown=True)
        if self._unknown:
            logger.warning(
                "IPU config keys that are not IPU settings here were kept as given: %s",
                ", ".join(self._unknown),
            )

    # Fields derived from layers_per_ipu when left at None.

    @property
    def ipus_per_replica(self) -> int:
        return self._ipus_per_replica if self._ipus_per_replica is not None else len(self.layers_per_ipu)

    @ipus_per_replica.setter
    def ipus_per_replica(self, value: int | None) -> None:
        self._ipus_per_replica = value

    @property
    def inference_ipus_per_replica(self) -> int:
        if self._inference_ipus_per_replica is not None:
            return self._inference_ipus_per_replica
        if self.inference_layers_per_ipu is not None:
            return len(self.inference_layers_per_ipu)
        return self.ipus_per_replica

    @inference_ipus_per_replica.setter
    def inference_ipus_per_replica(self, value: int | None) -> None:
        self._inference_ipus_per_replica = value

    @property
    def unknown_keys(self) -> list[str]:
        """Keys from the file or kwargs that are not IPU settings (kept and written back)."""
        return list(self._unknown)

    # Setting values.

    def _raw(self, name: str) -> Any:
        """The stored value, with None kept for fields derived from layers_per_ipu."""
        return getattr(self, f"_{name}") if name in _DERIVED_FIELDS else getattr(self, name)

    def _set(self, name: str, value: Any, allow_unknown: bool) -> None:
        if name in _VALIDATORS:
            setattr(self, name, _VALIDATORS[name](name, value))
            self._given.add(name)
        elif allow_unknown or name in self._unknown:
            self._unknown[name] = value
            # A key that would shadow a method or private state lives only in to_dict().
            if not name.startswith("_") and not hasattr(type(self), name):
                setattr(self, name, value)
        else:
            raise ValueError(
                f"unknown IPU config key {name!r}; valid keys: {', '.join(sorted(self._valid_keys()))}"
            )

    def _valid_keys(self) -> list[str]:
        return [*_DEFAULTS, *self._unknown]

    def update_from_string(self, update_str: str) -> None:
        """Apply "key=value,key=value" overrides, e.g. "device_iterations=1,layers_per_ipu=[1 3 4 4]".

        Values may be integers, floats, true/false, None/null, strings or space-separated lists in
        square brackets. Keys must be IPU settings (or keys already kept from the file); all values
        are checked before any is applied.
        """
        parsed: dict[str, Any] = {}
        for item in _OVERRIDE_SPLIT.split(update_str):
            if not item.strip():
                continue
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"malformed IPU config override {item.strip()!r}: expected key=value")
            if key not in _DEFAULTS and key not in self._unknown:
                raise ValueError(
                    f"unknown IPU config key {key!r} in override {item.strip()!r}; "
                    f"valid keys: {', '.join(sorted(self._valid_keys()))}"
                )
            like = self._raw(key) if key in _DEFAULTS else self._unknown[key]
            if like is None and key.startswith("inference_"):
                like = _DEFAULTS.get(key[len("inference_"):])
            value = _parse_value(text, like)
            parsed[key] = _VALIDATORS[key](key, value) if key in _VALIDATORS else value
        for key, value in parsed.items():
            self._set(key, value, allow_unknown=False)

    def validate(self) -> None:
        """Re-check every field (catching direct attribute assignment) and the placement lengths."""
        for name, check in _VALIDATORS.items():
            setattr(self, name, check(name, self._raw(name)))
        for for_inference in (False, True):
            self._check_placement_length(for_inference)

    # Reading values per mode.

    def get(self, name: str, for_inference: bool = False) -> Any:
        """The value of `name` for training, or for inference (its `inference_` twin unless None)."""
        if for_inference:
            twin = getattr(self, f"inference_{name}", None)
            if twin is not None:
                return twin
        if not hasattr(self, name):
            raise AttributeError(f"IPUConfig has no field {name!r}")
        return getattr(self, name)

    def batch_size_factor(self, for_inference: bool = False) -> int:
        """Samples per host step per micro-batch sample: replication * accumulation * iterations."""
        if for_inference:
            return self.inference_replication_factor * self.inference_device_iterations
        return self.replication_factor * self.gradient_accumulation_steps * self.device_iterations

    def _layers_field(self, for_inference: bool) -> str:
        if for_inference and self.inference_layers_per_ipu is not None:
            return "inference_layers_per_ipu"
        return "layers_per_ipu"

    def _check_placement_length(self, for_inference: bool) -> None:
        layers_name = self._layers_field(for_inference)
        ipus_name = "inference_ipus_per_replica" if for_inference else "ipus_per_replica"
        layers, ipus = getattr(self, layers_name), getattr(self, ipus_name)
        if len(layers) != ipus:
            raise IncompatibleIPUConfigError(
                f"incompatible IPU config: {layers_name} has {len(layers)} entries but {ipus_name}={ipus}; "
                f"give one entry per IPU or drop {ipus_name} to follow {layers_name}"
            )

    def resolved_layers_per_ipu(self, num_hidden_layers: int, for_inference: bool = False) -> list[int]:
        """Layers per IPU with -1 wildcards expanded, checked against the model's layer count.

        The layers not fixed by explicit entries are shared evenly among the -1 entries; when they do
        not divide evenly, the earliest -1 entries take one extra layer each ([1, -1, -1] on 12
        layers gives [1, 6, 5]). A wildcard may receive 0 layers.
        """
        name = self._layers_field(for_inference)
        layers = list(getattr(self, name))
        self._check_placement_length(for_inference)
        wildcards = [i for i, n in enumerate(layers) if n == -1]
        fixed = sum(n for n in layers if n != -1)
        if wildcards:
            remaining = num_hidden_layers - fixed
            if remaining < 0:
                raise IncompatibleIPUConfigError(
                    f"incompatible IPU config: {name}={layers} fixes {fixed} layers before sharing the rest "
                    f"among its -1 entries, but the model has {num_hidden_layers} (num_hidden_layers); "
                    f"fix {name}, e.g. {name}=[-1]"
                )
            share, extra = divmod(remaining, len(wildcards))
            for rank, i in enumerate(wildcards):
                layers[i] = share + (1 if rank < extra else 0)
        elif fixed != num_hidden_layers:
            raise IncompatibleIPUConfigError(
                f"incompatible IPU config: {name}={layers} places {fixed} layers but the model has "
                f"{num_hidden_layers} (num_hidden_layers); fix {name}, e.g. {name}=[-1]"
            )
        return layers

    def apply_n_ipu(self, n_ipu: int) -> None:
        """Set both replication factors from the total IPU count (the --n_ipu flag)."""
        if not _is_int(n_ipu) or n_ipu not in VALID_N_IPU:
            raise ValueError(f"n_ipu={n_ipu!r} is invalid: must be one of {', '.join(map(str, VALID_N_IPU))}")
        factors = {}
        for ipus_name in ("ipus_per_replica", "inference_ipus_per_replica"):
            ipus = getattr(self, ipus_name)
            if ipus > n_ipu or n_ipu % ipus:
                raise IncompatibleIPUConfigError(
                    f"incompatible IPU config: n_ipu={n_ipu} is not a multiple of {ipus_name}={ipus}"
                )
            factors[ipus_name] = n_ipu // ipus
        self.replication_factor = factors["ipus_per_replica"]
        self.inference_replication_factor = factors["inference_ipus_per_replica"]

    def ipu_only_settings(self) -> dict[str, Any]:
        """Settings from IPU_ONLY_SETTINGS that were given or differ from their default."""
        return {
            name: self._raw(name)
            for name in IPU_ONLY_SETTINGS
            if name in self._given or self._raw(name) != _DEFAULTS[name]
        }

    # Serialisation.

    def to_dict(self) -> dict[str, Any]:
        """All fields (derived ones as stored, None meaning "follow layers_per_ipu") and kept keys."""
        data = {name: copy.deepcopy(self._raw(name)) for name in _DEFAULTS}
        for name, value in self._unknown.items():
            data[name] = copy.deepcopy(self.__dict__.get(name, value))
        return data

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write `save_directory/ipu_config.json`, creating the folder; returns the file path."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CONFIG_NAME
        path.write_text(self.to_json_string(), encoding="utf-8")
        return path

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        pod_type: str | None = None,
        *,
        cache_dir: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        **overrides: Any,
    ) -> IPUConfig:
        """Load from a folder holding ipu_config.json, a .json file, or a hub repo id.

        `overrides` are IPU settings applied (and checked) after loading; unknown ones are an error.
        `cache_dir`, `revision` and `token` only matter for hub downloads.
        """
        path = _locate_config_file(str(name_or_path), cache_dir=cache_dir, revision=revision, token=token)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
            ) from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object of IPU settings, not {type(data).__name__}")
        config = cls(pod_type=pod_type, **data)
        for name, value in overrides.items():
            config._set(name, _resolve_pod_type(name, value, pod_type), allow_unknown=False)
        return config

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IPUConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


def _locate_config_file(
    name_or_path: str, cache_dir: str | None, revision: str | None, token: str | bool | None
) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        candidate = path / CONFIG_NAME
        if not candidate.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in folder {path}")
        return candidate
    if path.is_file():
        return path
    # Something that is clearly meant as a local path is not worth a hub round trip.
    if name_or_path.endswith(".json") or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"IPU config file not found: {name_or_path}")
    try:
        downloaded = hf_hub_download(
            repo_id=name_or_path, filename=CONFIG_NAME, cache_dir=cache_dir, revision=revision, token=token
        )
    except Exception as err:  # the hub raises many types; the user needs to know what was tried
        raise OSError(
            f"{name_or_path!r} is not a local folder or file, and could not download {CONFIG_NAME} "
            f"from the hub repo {name_or_path!r}: {err}"
        ) from err
    return Path(downloaded)
