"""The `ipu_config.json` of the IPU examples, readable and checked on any device.

An `IPUConfig` holds the settings the Graphcore examples kept next to the model config: replication,
gradient accumulation, device iterations, pipeline placement (`layers_per_ipu`) and a number of
compiler options. Files written for IPUs load unchanged: keys this class does not know are kept and
written back, POD-typed values (`{"pod16": 4, "default": 1}`) are resolved, and every value goes
through a validator whose error names the field and the value, on construction and on every
assignment (`config.replication_factor = 0` is refused).

The class behaves as optimum-graphcore's `IPUConfig` (its last release, 0.7) does:

- Modes: `config.mode` is "training" (the default) or "inference"; `train()` / `eval()` switch it. The
  private `_layers_per_ipu`, `_ipus_per_replica`, `_matmul_proportion`, the serialization settings and
  `_parallelize_kwargs` read and write the training field in training mode and its `inference_` twin in
  inference mode; the public names always mean what they say.
- Values that follow others are filled when the config is built: `ipus_per_replica` is
  `len(layers_per_ipu)`, `inference_layers_per_ipu` is `layers_per_ipu`, `inference_ipus_per_replica`
  and `inference_matmul_proportion` follow the training values by the original's rules, and a
  serialization factor is 1 unless serialized splits are given. Such a value keeps following when the
  value it follows is changed later (an override of `layers_per_ipu` moves `ipus_per_replica` with it),
  until it is set itself; setting it to None makes it follow again, and files store it as null.
- Cross-field checks when the config is built and in `validate()`: `matmul_proportion` and, when it has
  no -1 wildcard, `layers_per_ipu` give one entry per IPU; a serialization factor and serialized splits
  are not both given; serialized splits give one entry per IPU.
- Wildcards: the layers not fixed by explicit entries are shared evenly among the -1 entries, the
  remainder going to the last one.

Where the original was stricter than the files in the wild allow, this class keeps them loading; each
such place says so where it is decided.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from huggingface_hub import create_repo, hf_hub_download, upload_file

logger = logging.getLogger(__name__)

CONFIG_NAME = "ipu_config.json"
IPU_CONFIG_NAME = CONFIG_NAME  # the name optimum-graphcore code imports
VALID_N_IPU = (1, 2, 4, 8, 16, 32, 64)
ALLOWED_POD_TYPES = ("pod4", "pod8", "pod16", "pod32", "pod64")
OUTPUT_MODES = ("all", "sum", "final", "default")
MODES = ("training", "inference")

# The inference default of a list-valued matmul_proportion that does not fit the inference pipeline.
_FALLBACK_MATMUL_PROPORTION = 0.2

# Bookkeeping keys that files written by optimum-graphcore carry (its base config's attributes). They
# are kept like other unknown keys, without a warning: they are not settings anyone meant to change.
_METADATA_KEYS = frozenset({
    "transformers_version", "optimum_version", "model_type", "architectures", "torch_dtype", "dtype",
    "return_dict", "_name_or_path",
})

# Keyword arguments of `from_pretrained` that say where and how to fetch the file (the hub's), as
# opposed to overrides of IPU settings.
_HUB_KWARGS = frozenset({
    "cache_dir", "force_download", "resume_download", "proxies", "use_auth_token", "token", "local_files_only",
    "revision", "subfolder", "trust_remote_code", "user_agent", "_from_pipeline", "_from_auto", "_commit_hash",
})


class IncompatibleIPUConfigError(ValueError):
    """The IPU config contradicts itself or the model (layer counts, IPU counts)."""


class IPUConfigTypeError(TypeError, ValueError):
    """A value of the wrong type: a TypeError as in the original, and a ValueError like every other bad input."""


def ipu_only_error(name: str) -> NotImplementedError:
    """The error of an optimum-graphcore API that only means something on an IPU."""
    return NotImplementedError(
        f"{name} builds poptorch objects for Graphcore IPUs and has no meaning off the IPU: on CPUs and GPUs "
        "IPUTrainer applies the IPU config itself (see the README, 'Using code written for optimum-graphcore')"
    )


# Validators ------------------------------------------------------------------------------------
# Each takes (field name, value) and returns the value to store. Messages start the way the
# original's do ("`IPUConfig` attribute `name` must ..."), which code written for it matches on, and
# show `name=value`.

Validator = Callable[[str, Any], Any]


def _type_error(name: str, value: Any, expected: str) -> IPUConfigTypeError:
    return IPUConfigTypeError(
        f"`IPUConfig` attribute `{name}` must be {expected}. You provided {name}={value!r} ({type(value).__name__})"
    )


def _floor_error(name: str, value: Any, floor: int) -> ValueError:
    if isinstance(value, list):
        return ValueError(f"`IPUConfig` attribute `{name}` must have all elements >= {floor}. You provided {name}={value!r}")
    return ValueError(f"`IPUConfig` attribute `{name}` must be >= {floor}. You provided {name}={value!r}")


def _to_int(value: Any) -> Any:
    """2.0 read from JSON is the integer 2; 2.5 and True are left alone to be rejected.

    (The original refused 2.0 as a float; files in the wild must load, and 2.0 means 2.)
    """
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
        if not _is_int(value):
            raise _type_error(name, value, "an integer" + (" or null" if optional else ""))
        if value < minimum:
            raise _floor_error(name, value, minimum)
        return value

    return check


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _type_error(name, value, "true or false")
    return value


def _optional_int(name: str, value: Any) -> int | None:
    value = _to_int(value)
    if value is not None and not _is_int(value):
        raise _type_error(name, value, "an integer or null")
    return value


def _matmul_proportion(optional: bool) -> Validator:
    def check(name: str, value: Any) -> float | list[float] | None:
        if value is None and optional:
            return None
        if isinstance(value, (list, tuple)):
            if not value or not all(_is_number(v) for v in value):
                raise _type_error(name, value, "a number or a non-empty list of numbers (one per IPU)")
            floats = [float(v) for v in value]
            if min(floats) < 0:
                raise _floor_error(name, floats, 0)
            return floats
        if not _is_number(value):
            raise _type_error(name, value, "a number or a non-empty list of numbers (one per IPU)")
        if value < 0:
            raise _floor_error(name, value, 0)
        return float(value)

    return check


def _int_list(name: str, value: Any, floor: int, expected: str) -> list[int]:
    entries = [_to_int(v) for v in value] if isinstance(value, (list, tuple)) else None
    if not entries or not all(_is_int(v) for v in entries):
        raise _type_error(name, value, expected)
    if min(entries) < floor:
        raise _floor_error(name, entries, floor)
    return entries


def _layers_per_ipu(optional: bool) -> Validator:
    def check(name: str, value: Any) -> list[int] | None:
        if value is None and optional:
            return None
        return _int_list(name, value, -1, "a non-empty list of integers >= -1 (-1 shares the remaining layers)")

    return check


def _splits_per_ipu(name: str, value: Any) -> list[int] | None:
    if value is None:
        return None
    entries = _int_list(name, value, 0, "a list of integers >= 0, one per IPU")
    if sum(entries) < 1:
        raise ValueError(f"`IPUConfig` attribute `{name}={entries}` must have atleast 1 split on 1 IPU.")
    used = [i for i, v in enumerate(entries) if v]
    if used != list(range(used[0], used[-1] + 1)):
        raise ValueError(
            f"`IPUConfig` attribute `{name}={entries}` must have its splits on consecutive IPUs."
        )
    return entries


def _output_mode(name: str, value: Any) -> str:
    if value not in OUTPUT_MODES:
        raise ValueError(
            f"`IPUConfig` attribute `{name}` can only take values in {OUTPUT_MODES}. You provided {name}={value!r}"
        )
    return value


def _string(name: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _type_error(name, value, "a string")
    return value


def _kwargs_dict(name: str, value: Any) -> dict:
    # The original stores `value or {}`.
    if value is not None and not isinstance(value, dict):
        raise _type_error(name, value, "a JSON object or null")
    return copy.deepcopy(value) if value else {}


# The fields ------------------------------------------------------------------------------------
# Each setting once: its default, its validator, whether it only means something on an IPU, whether its None
# follows another value, whether a private name reads it per mode, and what it does. An `inference_` field is
# the evaluation twin of the field named after it and is documented with it. The README's field table is
# `field_table()`'s output (a test checks).

NO_EFFECT = "validated, logged once as having no effect"


@dataclass(frozen=True)
class Field:
    """One setting of an `ipu_config.json`."""

    name: str
    default: Any
    validator: Validator
    on_ipu: str = ""  # what it set on the IPU
    here: str = ""  # what it does on CPUs and GPUs
    flag: str = ""  # the command-line flag that also sets it
    ipu_only: bool = False  # no effect off the IPU: named once in the start-up log
    follows: bool = False  # None (its default) follows another value (see IPUConfig._derive)
    # `config._<name>` reads and writes this field in training mode and its `inference_` twin in inference mode
    per_mode: bool = False

    @property
    def twin_of(self) -> str | None:
        """The training field an `inference_` field is the evaluation twin of."""
        return self.name[len("inference_"):] if self.name.startswith("inference_") else None


FIELDS: tuple[Field, ...] = (
    Field("replication_factor", 1, _int_at_least(1), flag="`--n_ipu` ÷ `ipus_per_replica`",
          on_ipu="data-parallel replicas",
          here="replicas: one data-parallel process each under `torchrun`; replicas without a process of their own "
          "are emulated by accumulating their micro-batches (same average gradient)"),
    Field("inference_replication_factor", 1, _int_at_least(1)),
    Field("gradient_accumulation_steps", 1, _int_at_least(1), flag="`--gradient_accumulation_steps`",
          on_ipu="micro-batches per weight update", here="the same"),
    Field("device_iterations", 1, _int_at_least(1), on_ipu="weight updates (evaluation: batches) per host call",
          here="weight updates per trainer step; the learning-rate schedule advances once per step and `--max_steps` "
          "counts steps; evaluation batch = `per_device_eval_batch_size` × `inference_replication_factor` × "
          "`inference_device_iterations`"),
    Field("inference_device_iterations", 1, _int_at_least(1)),
    Field("layers_per_ipu", [-1], _layers_per_ipu(optional=False), per_mode=True, ipu_only=True,
          on_ipu="layers per pipeline stage",
          here="checked against the model's layer count (the same error as the original); one device holds a whole "
          "replica, or with `--pipeline` the layers per stage process"),
    Field("inference_layers_per_ipu", None, _layers_per_ipu(optional=True), ipu_only=True, follows=True),
    Field("ipus_per_replica", None, _int_at_least(1, optional=True), per_mode=True, ipu_only=True, follows=True,
          on_ipu="pipeline stages per replica (default: one per `layers_per_ipu` entry)",
          here="checked against `layers_per_ipu`; `--n_ipu` ÷ it gives the replicas; with `--pipeline`, processes "
          "per replica"),
    Field("inference_ipus_per_replica", None, _int_at_least(1, optional=True), ipu_only=True, follows=True),
    Field("embedding_serialization_factor", None, _int_at_least(1, optional=True), per_mode=True, follows=True,
          on_ipu="vocabulary matmul split in N",
          here="masked-LM and causal-LM vocabulary projection and loss computed in N chunks, each recomputed in "
          "backward: same numbers, lower peak memory"),
    Field("inference_embedding_serialization_factor", None, _int_at_least(1, optional=True), follows=True),
    Field("projection_serialization_factor", None, _int_at_least(1, optional=True), per_mode=True, follows=True,
          on_ipu="vocabulary projection split in N", here="as `embedding_serialization_factor`"),
    Field("inference_projection_serialization_factor", None, _int_at_least(1, optional=True), follows=True),
    Field("serialized_embedding_splits_per_ipu", None, _splits_per_ipu, per_mode=True, ipu_only=True,
          on_ipu="embedding split over IPUs", here=NO_EFFECT),
    Field("inference_serialized_embedding_splits_per_ipu", None, _splits_per_ipu, ipu_only=True),
    Field("serialized_projection_splits_per_ipu", None, _splits_per_ipu, per_mode=True, ipu_only=True,
          on_ipu="projection split over IPUs", here=NO_EFFECT),
    Field("inference_serialized_projection_splits_per_ipu", None, _splits_per_ipu, ipu_only=True),
    Field("recompute_checkpoint_every_layer", False, _boolean, flag="`--gradient_checkpointing`",
          on_ipu="recomputation checkpoints", here="activation checkpointing of every layer"),
    Field("optimizer_state_offchip", False, _boolean, ipu_only=True, on_ipu="optimizer state in streaming memory",
          here="on a GPU, optimizer state (and the update) in host memory: no optimizer state on the device, three "
          "parameter-sized copies per update; no effect on a CPU; under `--fsdp`, FSDP2's CPU offload of the shards and "
          "the update"),
    Field("replicated_tensor_sharding", False, _boolean, ipu_only=True,
          on_ipu="optimizer state sharded over replicas",
          here="optimizer state sharded over the data-parallel processes (ZeRO stage 1); no effect with one process; "
          "implied under `--fsdp` (FSDP shards it itself)"),
    Field("matmul_proportion", 0.2, _matmul_proportion(optional=False), per_mode=True, ipu_only=True,
          on_ipu="IPU memory for matmuls", here=NO_EFFECT),
    Field("inference_matmul_proportion", None, _matmul_proportion(optional=True), ipu_only=True, follows=True),
    Field("enable_half_partials", True, _boolean, ipu_only=True, on_ipu="float16 matmul partials", here=NO_EFFECT),
    Field("enable_half_first_order_momentum", False, _boolean, ipu_only=True, on_ipu="float16 first-order momentum",
          here=NO_EFFECT + " (optimizer state is float32)"),
    Field("auto_loss_scaling", False, _boolean, flag="`--auto_loss_scaling`", on_ipu="automatic loss scaling",
          here="float16 runs: a dynamic loss scale starting at `--loss_scaling`"),
    Field("output_mode", "final", _output_mode, ipu_only=True, on_ipu="which micro-batches' outputs reach the host",
          here=NO_EFFECT),
    Field("seed", None, _optional_int, on_ipu="IPU random seed", here="set from `--seed`, which seeds the run"),
    Field("executable_cache_dir", "", _string, on_ipu="compiled executables",
          here="`torch.compile` (inductor) cache for `--torch_compile` and `--compile_only`"),
    Field("async_dataloader", False, _boolean, ipu_only=True, on_ipu="asynchronous data loading",
          here=NO_EFFECT + " (`--dataloader_mode` chooses)"),
    Field("explicit_ir_inference", False, _boolean, ipu_only=True, on_ipu="PopART option (optimum-graphcore 0.7)",
          here=NO_EFFECT),
    Field("execute_encoder_on_cpu_for_generation", False, _boolean, ipu_only=True,
          on_ipu="PopART option (optimum-graphcore 0.7)", here=NO_EFFECT),
    Field("parallelize_kwargs", None, _kwargs_dict, per_mode=True, ipu_only=True,
          on_ipu="arguments of the model's parallelize()",
          here=NO_EFFECT),
    Field("inference_parallelize_kwargs", None, _kwargs_dict, ipu_only=True),
)
_FIELDS_BY_NAME = {field.name: field for field in FIELDS}
_DEFAULTS: dict[str, Any] = {field.name: field.default for field in FIELDS}
_VALIDATORS: dict[str, Validator] = {field.name: field.validator for field in FIELDS}
_FOLLOWING = frozenset(field.name for field in FIELDS if field.follows)
# Settings that steer the Poplar compiler or the placement of layers on IPUs: off the IPU they change nothing, so
# the trainer names them once in its log instead of silently ignoring them. executable_cache_dir is not among them:
# the trainer reuses it as the torch.compile cache.
IPU_ONLY_SETTINGS: tuple[str, ...] = tuple(field.name for field in FIELDS if field.ipu_only)
# Fields whose value is legitimately a dict, so a dict there is not a per-POD-type table.
_DICT_FIELDS = frozenset(field.name for field in FIELDS if field.validator is _kwargs_dict)


def field_table() -> str:
    """The README's table of what each field does here, one row per field and its evaluation twin."""
    rows = ["| field | on the IPU | on CPU / GPU |", "| --- | --- | --- |"]
    for field in FIELDS:
        if field.twin_of in _FIELDS_BY_NAME:
            continue
        label = f"`{field.name}`"
        if f"inference_{field.name}" in _FIELDS_BY_NAME:
            label += f", `inference_{field.name}`"
        if field.flag:
            label += f" ({field.flag})"
        rows.append(f"| {label} | {field.on_ipu} | {field.here} |")
    return "\n".join(rows) + "\n"


def _is_pod_table(name: str, value: Any) -> bool:
    """A per-POD-type table such as {"pod16": 4, "default": 1}: a dict keyed by POD types (and "default")."""
    return (
        isinstance(value, dict) and bool(value) and name not in _DICT_FIELDS
        and set(value) <= {*ALLOWED_POD_TYPES, "default"}
    )


def _resolve_pod_type(name: str, value: Any, pod_type: str | None) -> Any:
    """Pick the entry of a per-POD-type table; any other value is returned as it is."""
    if not _is_pod_table(name, value):
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


def parse_scalar(text: str) -> Any:
    """A value written in an override string: true/false, none/null, an int, a float, else the text itself."""
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
        return [parse_scalar(t) for t in re.split(r"[\s,]+", text[1:-1].strip()) if t]
    if isinstance(like, str):
        # A path or mode stays text even when it looks like a number.
        return text
    value = parse_scalar(text)
    if isinstance(like, float) and _is_int(value):
        return float(value)
    return value


class _ModeField:
    """A private name (`_layers_per_ipu`) that reads and writes the training field in training mode and
    its `inference_` twin in inference mode."""

    def __init__(self, name: str) -> None:
        self.name = name

    def field(self, config: IPUConfig) -> str:
        return f"inference_{self.name}" if config.mode == "inference" else self.name

    def __get__(self, config: IPUConfig | None, owner: type | None = None) -> Any:
        if config is None:
            return self
        return getattr(config, self.field(config))

    def __set__(self, config: IPUConfig, value: Any) -> None:
        setattr(config, self.field(config), value)


_DEFAULT_DICT: dict[str, Any] | None = None


class IPUConfig:
    """IPU execution settings; see the module docstring for the file format and the semantics."""

    CONFIG_NAME = CONFIG_NAME
    FULL_CONFIGURATION_FILE = CONFIG_NAME
    modes = MODES

    # The settings themselves are the attributes named in FIELDS (defaults and validators there), and the
    # private mode fields (`_layers_per_ipu`, ...) are added after the class for the fields marked per_mode.

    def __init__(self, pod_type: str | None = None, **kwargs: Any) -> None:
        """Every field is a keyword argument (see `FIELDS`); `pod_type` picks the entries of per-POD-type
        values (a "default" entry otherwise).

        Keys that are not IPU settings are kept and written back with a warning: files in the wild carry
        them (the original 0.7 refused them, which its earlier releases did not).
        """
        state = self.__dict__
        state["_mode"] = "training"
        state["_unknown"] = {}
        # Fields named in the file or set later, reported by ipu_only_settings() even at their default.
        state["_given"] = set()
        state["_followers"] = set(_FOLLOWING)
        # Fields whose value was picked from a per-POD-type table, and the table, for for_pod_type().
        state["_pod_tables"] = {}
        for name, default in _DEFAULTS.items():
            state[name] = _VALIDATORS[name](name, copy.deepcopy(default))
        self._derive()
        for name, value in kwargs.items():
            if name in _DEFAULTS and _is_pod_table(name, value):
                setattr(self, name, _resolve_pod_type(name, value, pod_type))
                self._pod_tables[name] = copy.deepcopy(value)
            else:
                self._set(name, value, allow_unknown=True)
        reported = [name for name in self._unknown if name not in _METADATA_KEYS]
        if reported:
            logger.warning("IPU config keys that are not IPU settings here were kept as given: %s", ", ".join(reported))
        self._check_consistency()

    # Modes.

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in self.modes:
            raise ValueError(
                f"`IPUConfig` mode can only take values in {self.modes}. You provided: value={value!r}. "
                "Use the `train` and `eval` methods instead to avoid error."
            )
        self.__dict__["_mode"] = value

    def train(self) -> IPUConfig:
        """Training mode: the private mode fields (`_layers_per_ipu`, ...) read the training values."""
        self.__dict__["_mode"] = "training"
        return self

    def eval(self) -> IPUConfig:
        """Inference mode: the private mode fields read the `inference_` twins."""
        self.__dict__["_mode"] = "inference"
        return self

    @contextlib.contextmanager
    def _in_mode(self, mode: str) -> Iterator[IPUConfig]:
        previous = self.mode
        self.mode = mode
        try:
            yield self
        finally:
            self.mode = previous

    def _get_managed_attr_mode_name(self, attr: str) -> str:
        """The field a mode-dependent name refers to in the current mode (for messages)."""
        if self.mode == "inference" and attr in _DEFAULTS and f"inference_{attr}" in _DEFAULTS:
            return f"inference_{attr}"
        return attr

    # Setting values.

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _VALIDATORS:
            value = _VALIDATORS[name](name, value)
            self.__dict__[name] = value
            if name in _FOLLOWING:
                (self._followers.add if value is None else self._followers.discard)(name)
            self._given.add(name)
            self._pod_tables.pop(name, None)
            self._derive()
        elif name.startswith("_") or hasattr(type(self), name):
            object.__setattr__(self, name, value)  # private state, the mode fields and properties
        else:
            self._keep(name, value)

    def _derive(self) -> None:
        """Fill the values that follow others (module docstring), in dependency order."""
        values, followers = self.__dict__, self._followers
        if "ipus_per_replica" in followers:
            values["ipus_per_replica"] = len(values["layers_per_ipu"])
        if "inference_layers_per_ipu" in followers:
            values["inference_layers_per_ipu"] = list(values["layers_per_ipu"])
        if "inference_ipus_per_replica" in followers:
            # The original's rule: an inference pipeline given by its layers sets its length; so does an
            # ipus_per_replica that itself just follows layers_per_ipu. Otherwise inference uses as many IPUs.
            ipus, layers, inference_layers = (
                values["ipus_per_replica"], values["layers_per_ipu"], values["inference_layers_per_ipu"]
            )
            follows_layers = ipus == len(layers) or inference_layers != [-1]
            values["inference_ipus_per_replica"] = len(inference_layers) if follows_layers else ipus
        if "inference_matmul_proportion" in followers:
            # A per-IPU list that does not fit the inference pipeline falls back to the default, as in the
            # original; a one-entry list applies to every IPU (see _check_consistency) and fits any.
            proportion = values["matmul_proportion"]
            fits = not isinstance(proportion, list) or len(proportion) in (1, values["inference_ipus_per_replica"])
            values["inference_matmul_proportion"] = copy.deepcopy(proportion) if fits else _FALLBACK_MATMUL_PROPORTION
        for prefix in ("", "inference_"):
            for layer in ("embedding", "projection"):
                factor = f"{prefix}{layer}_serialization_factor"
                if factor in followers:
                    values[factor] = None if values[f"{prefix}serialized_{layer}_splits_per_ipu"] else 1

    def _keep(self, name: str, value: Any) -> None:
        """Keep a key that is not an IPU setting; it is written back by to_dict()."""
        self._unknown[name] = value
        # A key that would shadow a method or private state lives only in to_dict().
        if not name.startswith("_") and not hasattr(type(self), name):
            self.__dict__[name] = value

    @property
    def unknown_keys(self) -> list[str]:
        """Keys from the file or kwargs that are not IPU settings (kept and written back)."""
        return list(self._unknown)

    def _raw(self, name: str) -> Any:
        """The stored value, None for a value that follows another."""
        return None if name in self._followers else getattr(self, name)

    def _set(self, name: str, value: Any, allow_unknown: bool) -> None:
        if name in _VALIDATORS:
            setattr(self, name, value)
        elif allow_unknown or name in self._unknown:
            self._keep(name, value)
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
        are checked before any is applied. Cross-field checks are left to `validate()`, as the original
        left them to the model's placement.
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
            like = getattr(self, key) if key in _DEFAULTS else self._unknown[key]
            if like is None and key.startswith("inference_"):
                like = _DEFAULTS.get(key[len("inference_"):])
            value = _parse_value(text, like)
            parsed[key] = _VALIDATORS[key](key, value) if key in _VALIDATORS else value
        for key, value in parsed.items():
            self._set(key, value, allow_unknown=False)

    def validate(self) -> None:
        """Re-check every field and the cross-field rules of both modes (after overrides, say)."""
        for name, check in _VALIDATORS.items():
            check(name, self._raw(name))
        self._check_consistency()

    def _check_consistency(self) -> None:
        """The original's cross-field checks, in each mode; IncompatibleIPUConfigError names both fields."""
        if self.replicated_tensor_sharding and self.replication_factor == 1:
            logger.debug("replicated_tensor_sharding has no replicas to shard over with replication_factor=1")
        for mode in self.modes:
            with self._in_mode(mode):
                ipus_name, ipus = self._get_managed_attr_mode_name("ipus_per_replica"), self._ipus_per_replica
                proportion = self._matmul_proportion
                # A one-entry list applies to every IPU: the examples' own ipu_config.json gives [0.25] for a
                # 4-IPU pipeline (the original refused it).
                if isinstance(proportion, list) and len(proportion) not in (1, ipus):
                    name = self._get_managed_attr_mode_name("matmul_proportion")
                    raise IncompatibleIPUConfigError(
                        f"{name}={proportion} should use the same number of IPUs as {ipus_name}={ipus}: give one "
                        f"value per IPU or a single number"
                    )
                layers = self._layers_per_ipu
                if -1 not in layers and len(layers) != ipus:
                    name = self._get_managed_attr_mode_name("layers_per_ipu")
                    raise IncompatibleIPUConfigError(
                        f"{name}={layers} should use the same number of IPUs as {ipus_name}={ipus}: give one entry "
                        f"per IPU, or leave {ipus_name} out to follow {name}"
                    )
                for layer in ("embedding", "projection"):
                    splits_name = self._get_managed_attr_mode_name(f"serialized_{layer}_splits_per_ipu")
                    factor_name = self._get_managed_attr_mode_name(f"{layer}_serialization_factor")
                    splits, factor = getattr(self, splits_name), getattr(self, factor_name)
                    # A factor of 1 means "not serialized", so it does not contradict splits (the original
                    # refused any factor next to splits).
                    if splits and factor and factor != 1:
                        raise IncompatibleIPUConfigError(
                            f"Only one of `{factor_name}` and `{splits_name}` should be used at once: "
                            f"{factor_name}={factor} serializes the {layer} on one IPU, {splits_name}={splits} "
                            "places its splits on several"
                        )
                    if splits and len(splits) != ipus:
                        raise IncompatibleIPUConfigError(
                            f"{splits_name}={splits} should use the same number of IPUs as {ipus_name}={ipus}."
                        )

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

    def batch_size_factor(self, for_inference: bool = False, pod_type: str | None = None) -> int:
        """Samples per host step per micro-batch sample: replication * accumulation * iterations.

        `pod_type` (the 0.3-0.6 API) computes it for the config specialised to that POD type.
        """
        if pod_type is not None:
            return self.for_pod_type(pod_type).batch_size_factor(for_inference)
        if for_inference:
            return self.inference_replication_factor * self.inference_device_iterations
        return self.replication_factor * self.gradient_accumulation_steps * self.device_iterations

    def for_pod_type(self, pod_type: str | None = None) -> IPUConfig:
        """A copy with every per-POD-type value picked for `pod_type` (its "default" entry for None), as the
        optimum-graphcore 0.3-0.6 releases specialised a config; values given plainly are unchanged."""
        if pod_type is not None and pod_type not in ALLOWED_POD_TYPES:
            raise ValueError(
                f"pod_type={pod_type!r} is not a POD type: choose one of {', '.join(ALLOWED_POD_TYPES)}"
            )
        specialised = copy.deepcopy(self)
        for name, table in self._pod_tables.items():
            setattr(specialised, name, _resolve_pod_type(name, table, pod_type))
            specialised._pod_tables[name] = copy.deepcopy(table)
        return specialised

    def resolved_layers_per_ipu(self, num_hidden_layers: int, for_inference: bool = False) -> list[int]:
        """Layers per IPU with -1 wildcards expanded, checked against the model's layer count.

        As the original places them: a one-IPU pipeline takes every layer; the layers not fixed by
        explicit entries are shared evenly among the -1 entries, the remainder going to the last -1
        ([1, -1, -1] on 12 layers gives [1, 5, 6]); a wildcard may receive 0 layers.
        """
        with self._in_mode("inference" if for_inference else "training"):
            return self._expand_layers_per_ipu(num_hidden_layers)

    def _expand_layers_per_ipu(self, num_layers: int) -> list[int]:
        name, ipus_name = self._get_managed_attr_mode_name("layers_per_ipu"), self._get_managed_attr_mode_name(
            "ipus_per_replica"
        )
        layers, ipus = list(self._layers_per_ipu), self._ipus_per_replica
        fixed = sum(n for n in layers if n != -1)
        if ipus == 1:
            # One explicit entry must still count the model's layers (the original ignored it).
            if -1 in layers or len(layers) != 1 or fixed == num_layers:
                return [num_layers]
        elif layers in ([-1], [-1] * ipus):
            share, extra = divmod(num_layers, ipus)
            return [share] * (ipus - 1) + [share + extra]
        elif len(layers) != ipus:
            raise IncompatibleIPUConfigError(
                f"{name} has a non-default value set, but its length does not match {ipus_name}: {name}={layers} "
                f"has {len(layers)} entries and {ipus_name}={ipus}; give one entry per IPU"
            )
        elif -1 in layers:
            wildcards = [i for i, n in enumerate(layers) if n == -1]
            remaining = num_layers - fixed
            if remaining < 0:
                raise IncompatibleIPUConfigError(
                    f"incompatible IPU config: {name}={layers} fixes {fixed} layers before sharing the rest "
                    f"among its -1 entries, but the model has {num_layers} (num_hidden_layers); "
                    f"fix {name}, e.g. {name}=[-1]"
                )
            share, extra = divmod(remaining, len(wildcards))
            for i in wildcards:
                layers[i] = share
            layers[wildcards[-1]] += extra
            return layers
        if fixed != num_layers:
            raise IncompatibleIPUConfigError(
                f"{name} does not define the correct number of layers for the current model: {name}={layers} "
                f"places {fixed} layers but the model has {num_layers} (num_hidden_layers); fix {name}, "
                f"e.g. {name}=[-1]"
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
        """Settings from IPU_ONLY_SETTINGS that were given or differ from a default config's."""
        defaults = _default_dict()
        settings = {}
        for name in IPU_ONLY_SETTINGS:
            if name in self._followers:
                continue
            value = self._raw(name)
            if name in self._given or value != defaults[name]:
                settings[name] = value
        return settings

    def to_options(self, for_inference: bool = False, compile_only: bool = False, pod_type: str | None = None) -> Any:
        """The original's poptorch options; IPU-only."""
        raise ipu_only_error("IPUConfig.to_options()")

    # Serialisation.

    def to_dict(self) -> dict[str, Any]:
        """Every field (null for a value that follows another) and the kept keys."""
        data = {name: copy.deepcopy(self._raw(name)) for name in _DEFAULTS}
        data.update(copy.deepcopy(self._unknown))
        return data

    def to_diff_dict(self) -> dict[str, Any]:
        """What the original wrote with `use_diff=True`: every IPU setting (its diff was taken against a
        base config that has none of them), so it is `to_dict()` here too and files stay complete."""
        return self.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        data = self.to_diff_dict() if use_diff else self.to_dict()
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | Path, use_diff: bool = True) -> None:
        Path(json_file_path).write_text(self.to_json_string(use_diff=use_diff), encoding="utf-8")

    def save_pretrained(self, save_directory: str | Path, push_to_hub: bool = False, **kwargs: Any) -> Path:
        """Write `save_directory/ipu_config.json`, creating the folder; returns the file path.

        With `push_to_hub=True` the file is also uploaded to the hub repo `repo_id` (default: the folder's
        name); `commit_message`, `private` and `token` are passed on.
        """
        folder = Path(save_directory)
        if folder.is_file():
            raise ValueError(f"save_pretrained: {folder} is a file; give the folder to write {CONFIG_NAME} into")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CONFIG_NAME
        self.to_json_file(path)
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", folder.resolve().name)
            self._upload(path, repo_id, **kwargs)
        return path

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        use_auth_token: str | bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Upload this config as `ipu_config.json` to the hub repo `repo_id` (created if missing)."""
        with tempfile.TemporaryDirectory() as folder:
            path = self.save_pretrained(folder)
            return self._upload(
                path, repo_id, commit_message=commit_message, private=private, token=token or use_auth_token, **kwargs
            )

    def _upload(self, path: Path, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                token: str | bool | None = None, **kwargs: Any) -> Any:
        token = token if token is not None else kwargs.pop("use_auth_token", None)
        create_repo(repo_id, token=token, private=private, exist_ok=True)
        return upload_file(
            path_or_fileobj=str(path), path_in_repo=CONFIG_NAME, repo_id=repo_id, token=token,
            commit_message=commit_message or "Upload IPU config", revision=kwargs.get("revision"),
            create_pr=kwargs.get("create_pr"),
        )

    @classmethod
    def from_dict(
        cls, config_dict: dict[str, Any], pod_type: str | None = None, return_unused_kwargs: bool = False,
        **kwargs: Any,
    ) -> IPUConfig | tuple[IPUConfig, dict[str, Any]]:
        """Build from a dict of fields, then apply `kwargs` as overrides of IPU settings (checked).

        Unknown override keys are an error, or returned with `return_unused_kwargs=True` (as the original
        returned them; without it the original dropped them silently).
        """
        for internal in ("_from_auto", "_from_pipeline"):
            kwargs.pop(internal, None)
        config = cls(pod_type=pod_type, **config_dict)
        unused = {}
        for name, value in kwargs.items():
            if return_unused_kwargs and name not in _DEFAULTS and name not in config._unknown:
                unused[name] = value
                continue
            config._set(name, _resolve_pod_type(name, value, pod_type), allow_unknown=False)
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def from_json_file(cls, json_file: str | Path, pod_type: str | None = None) -> IPUConfig:
        """Read a .json file of IPU settings; `pod_type` picks the per-POD entries, as in `from_dict`."""
        return cls.from_dict(_read_json(Path(json_file)), pod_type=pod_type)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, pod_type: str | None = None, **kwargs: Any
    ) -> IPUConfig | tuple[IPUConfig, dict[str, Any]]:
        """Load from a folder holding ipu_config.json, a .json file, or a hub repo id.

        The hub's keywords (`cache_dir`, `revision`, `token` / `use_auth_token`, `force_download`,
        `local_files_only`, `subfolder`, ...) say where to fetch the file; the other `kwargs` are IPU
        settings applied (and checked) after loading, as in `from_dict`.
        """
        hub = {name: kwargs.pop(name) for name in list(kwargs) if name in _HUB_KWARGS}
        if hub.pop("trust_remote_code", False):
            logger.warning("trust_remote_code has no meaning for an IPU config (it holds no code); ignored")
        path = locate_config_file(pretrained_model_name_or_path, **hub)
        return cls.from_dict(_read_json(path), pod_type=pod_type, **kwargs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IPUConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


for _field in FIELDS:
    if _field.per_mode:
        setattr(IPUConfig, f"_{_field.name}", _ModeField(_field.name))
del _field


def _default_dict() -> dict[str, Any]:
    global _DEFAULT_DICT
    if _DEFAULT_DICT is None:
        _DEFAULT_DICT = IPUConfig().to_dict()
    return _DEFAULT_DICT


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object of IPU settings, not {type(data).__name__}")
    return data


def locate_config_file(name_or_path: str | Path, **hub: Any) -> Path:
    """Where the IPU config that `name_or_path` names is: a folder's `ipu_config.json` (in its `subfolder`), a
    .json file, or a hub repo's `ipu_config.json`, downloaded or, with `local_files_only`, found in the hub cache.
    `hub` holds `from_pretrained`'s hub keywords. Raises FileNotFoundError for a local path that holds no config,
    and an OSError raised from the hub's own error when the hub repo's file cannot be had."""
    name_or_path = str(name_or_path)
    subfolder = hub.get("subfolder") or ""
    path = Path(name_or_path).expanduser() / subfolder if subfolder else Path(name_or_path).expanduser()
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
    token = hub.get("token")
    if token is None:
        token = hub.get("use_auth_token")
    try:
        downloaded = hf_hub_download(
            repo_id=name_or_path, filename=CONFIG_NAME, subfolder=subfolder or None, cache_dir=hub.get("cache_dir"),
            revision=hub.get("revision"), token=token, force_download=bool(hub.get("force_download")),
            local_files_only=bool(hub.get("local_files_only")),
        )
    except Exception as err:  # the hub raises many types; the user needs to know what was tried
        raise OSError(
            f"{name_or_path!r} is not a local folder or file, and could not download {CONFIG_NAME} "
            f"from the hub repo {name_or_path!r}: {err}"
        ) from err
    return Path(downloaded)
