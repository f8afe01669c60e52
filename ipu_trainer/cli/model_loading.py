"""Config, tokenizer and IPU config resolution shared by the three example scripts.

Every name given on the command line is loaded through `hub.load_local_or_hub`, so a missing folder or an
unreachable hub is one line naming the flag, and bad content (no vocabulary, overrides that do not apply,
an IPU config that is not JSON) is refused here, before any data or weights are loaded.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
from huggingface_hub.errors import RemoteEntryNotFoundError
from transformers import CONFIG_MAPPING, AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase, set_seed

from ..config.ipu_config import CONFIG_NAME as IPU_CONFIG_NAME
from ..config.ipu_config import IPUConfig, locate_config_file, parse_scalar
from ..run.training_args import IPUTrainingArguments
from .hub import HubError, error_chain, hub_token, load_local_or_hub

logger = logging.getLogger(__name__)


def _hub_kwargs(model_args: Any) -> dict[str, Any]:
    """What transformers' from_pretrained takes from the model arguments: cache, revision, --token and
    --trust_remote_code."""
    return {
        "cache_dir": getattr(model_args, "cache_dir", None),
        "revision": getattr(model_args, "model_revision", "main"),
        "token": hub_token(model_args),
        "trust_remote_code": getattr(model_args, "trust_remote_code", False),
    }


def load_model_config(model_args: Any) -> PretrainedConfig:
    """`--config_name`, else `--model_name_or_path`, else a fresh config of `--model_type`; then
    `--config_overrides`."""
    if model_args.config_name or model_args.model_name_or_path:
        flag = "--config_name" if model_args.config_name else "--model_name_or_path"
        name = model_args.config_name or model_args.model_name_or_path
        _require_file_in_folder(flag, name, ("config.json",), "a model config")
        config = load_local_or_hub(flag, name, lambda local_only: AutoConfig.from_pretrained(
            name, local_files_only=local_only, **_hub_kwargs(model_args)))
    elif model_args.model_type:
        if model_args.model_type not in CONFIG_MAPPING:
            raise ValueError(
                f"--model_type {model_args.model_type!r} is not a model type. Valid model types include: "
                f"{_common_model_types()} (all {len(list(CONFIG_MAPPING.keys()))} are listed in transformers.CONFIG_MAPPING). To start from a named checkpoint's architecture use "
                f"--config_name {model_args.model_type} instead."
            )
        config = CONFIG_MAPPING[model_args.model_type]()
    else:
        raise ValueError("No model given: pass --model_name_or_path, --config_name or --model_type.")

    if model_args.config_overrides:
        logger.info("Overriding config: %s", model_args.config_overrides)
        apply_config_overrides(config, model_args.config_overrides)
    return config


def apply_config_overrides(config: PretrainedConfig, overrides: str) -> None:
    """`--config_overrides "key=value,key=value"`, applied with transformers' `update_from_string` item by item,
    so an error names the item. Keys whose current value is None (e.g. GPT-2's pad_token_id) are set here
    instead: `update_from_string` takes the type from the current value and has none to take."""
    items = []
    for item in overrides.split(","):
        if not item.strip():
            continue
        key, separator, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not separator or not key or "=" in text:
            raise ValueError(
                f"--config_overrides {overrides!r}: {item.strip()!r} is not key=value (one '=' per item, items "
                "separated by commas, e.g. hidden_size=1024,num_hidden_layers=24)"
            )
        if not hasattr(config, key):
            raise ValueError(
                f"--config_overrides {overrides!r}: {key!r} is not a setting of {type(config).__name__} "
                "(see its config.json for the names)"
            )
        items.append((key, text))
    for key, text in items:
        if getattr(config, key) is None:
            setattr(config, key, parse_scalar(text))  # no current value to take the type from
            continue
        try:
            config.update_from_string(f"{key}={text}")
        except (ValueError, TypeError) as error:
            raise ValueError(f"--config_overrides: {key}={text}: {error} (current value: {getattr(config, key)!r})") from None


def _common_model_types() -> str:
    common = ["albert", "bert", "distilbert", "gpt2", "gpt_neo", "llama", "roberta", "xlm-roberta"]
    return ", ".join(t for t in common if t in CONFIG_MAPPING)


# Files of which a tokenizer folder written by save_pretrained holds at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")


def _require_file_in_folder(flag: str, name: str, files: tuple[str, ...], what: str, hint: str = "") -> None:
    """A local folder must hold one of `files`; transformers would otherwise fail with a message about something
    else (a missing model type, sentencepiece not installed)."""
    folder = os.path.expanduser(name)
    if os.path.isdir(folder) and not any(os.path.isfile(os.path.join(folder, f)) for f in files):
        raise FileNotFoundError(
            f"{flag} {name}: the folder holds no {' / '.join(files[:3])}{' ...' if len(files) > 3 else ''}, so it is "
            f"not {what} written by save_pretrained{hint}"
        )


def load_tokenizer(model_args: Any) -> PreTrainedTokenizerBase:
    """`--tokenizer_name`, else `--model_name_or_path`; refused when it has no vocabulary."""
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if not name:
        raise ValueError(
            "No tokenizer given: this script does not train tokenizers. Pass --tokenizer_name (a folder saved with "
            "save_pretrained or a hub id); to build one offline: python -m ipu_trainer.cli.offline_assets quickstart."
        )
    flag = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
    _require_file_in_folder(flag, name, TOKENIZER_FILES, "a tokenizer",
                            "" if model_args.tokenizer_name else "; pass --tokenizer_name")
    # A tokenizer-only folder has no config.json: AutoTokenizer then builds an empty model config in its place and
    # logs it whole (a config dump with nothing in it). That same empty config is given here, without the dump.
    folder = os.path.expanduser(name)
    no_model_config = os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "config.json"))
    config_kwargs = {"config": PretrainedConfig()} if no_model_config else {}
    tokenizer = load_local_or_hub(flag, name, lambda local_only: AutoTokenizer.from_pretrained(
        name, use_fast=getattr(model_args, "use_fast_tokenizer", True), local_files_only=local_only,
        **config_kwargs, **_hub_kwargs(model_args)))
    check_tokenizer_vocabulary(tokenizer, flag, name)
    return tokenizer


def check_tokenizer_vocabulary(tokenizer: PreTrainedTokenizerBase, flag: str, name: str) -> None:
    """A folder with a tokenizer_config.json but no vocabulary file loads as a tokenizer of special tokens only,
    which turns every word into the unknown token (and trains to a NaN loss): refused."""
    special = set(tokenizer.all_special_tokens)
    if not any(token not in special for token in tokenizer.get_vocab()):
        raise ValueError(
            f"{flag} {name}: the tokenizer has no vocabulary, only its {len(special)} special token(s), so every word "
            f"would become {tokenizer.unk_token or 'unknown'}: the folder needs the vocabulary file(s) save_pretrained "
            "writes (tokenizer.json, or vocab.txt / vocab.json and merges.txt)"
        )


def load_ipu_config(training_args: IPUTrainingArguments, model_name_or_path: Optional[str]) -> IPUConfig:
    """The IPU config file of the run: --ipu_config_name, else the one stored with --model_name_or_path, with
    per-POD-type values picked for --pod_type. The command line is applied to it once, by `resolve_run`."""
    name = training_args.ipu_config_name or model_name_or_path
    give_one = ("pass --ipu_config_name (a folder with ipu_config.json, a .json file, or a hub id such as "
                "Graphcore/bert-base-ipu), e.g. --ipu_config_name . for the ipu_config.json in the current folder")
    if not name:
        raise ValueError(f"You must provide an IPUConfig: {give_one}.")
    flag = "--ipu_config_name" if training_args.ipu_config_name else "--model_name_or_path"
    path = os.path.expanduser(name)
    if os.path.exists(path):
        try:
            path = locate_config_file(path)
        except FileNotFoundError:  # a folder without the file
            if flag == "--model_name_or_path":
                raise ValueError(f"You must provide an IPUConfig: --model_name_or_path {name} holds no {IPU_CONFIG_NAME}; {give_one}") from None
            raise FileNotFoundError(f"--ipu_config_name {name}: the folder holds no {IPU_CONFIG_NAME}") from None
    else:
        try:
            path = load_local_or_hub(flag, name, lambda local_only: locate_config_file(name, local_files_only=local_only),
                                     what="folder or .json file", example="Graphcore/bert-base-ipu")
        except HubError as error:
            if not any(isinstance(cause, RemoteEntryNotFoundError) for cause in error_chain(error)):
                raise
            if flag == "--model_name_or_path":
                raise ValueError(f"You must provide an IPUConfig: {name} on the hub has no {IPU_CONFIG_NAME}; {give_one}") from None
            raise HubError(f"--ipu_config_name {name}: the hub repository holds no {IPU_CONFIG_NAME}") from None
    try:
        ipu_config = IPUConfig.from_json_file(path, pod_type=training_args.pod_type)
    except UnicodeDecodeError:
        raise ValueError(
            f"{flag} {name}: {path} is not a text file (not UTF-8 JSON); give the IPU config as an ipu_config.json "
            "of settings, like the one in the repository root"
        ) from None
    except ValueError as error:
        raise ValueError(f"{flag} {name}: {error}") from None
    try:
        # The file's own cross-field rules, so that a problem of the file names the file; the command line is applied
        # (and checked) once, by resolve_run.
        ipu_config.validate()
    except ValueError as error:
        raise ValueError(f"{flag} {name}: {error}") from None
    return ipu_config


# Model types whose position ids start after the padding index (RoBERTa's "padding_idx + 1" offset).
_POSITIONS_OFFSET_BY_PADDING = ("roberta", "xlm-roberta", "camembert", "longformer")


def max_positions_of(config: PretrainedConfig) -> Optional[int]:
    """The longest sequence the model's position embeddings take (`n_positions` / `max_position_embeddings`),
    less RoBERTa-style models' padding offset; None for models without absolute positions."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(positions, int):
        return None
    if getattr(config, "model_type", None) in _POSITIONS_OFFSET_BY_PADDING and config.pad_token_id is not None:
        positions -= config.pad_token_id + 1
    return positions


def check_sequence_length_fits(length: int, config: PretrainedConfig, source: str) -> None:
    """Data of `length`-token sequences (from `source`, e.g. "--dataset_path DIR") against the model's positions:
    longer sequences would only fail at the first step, inside the embeddings."""
    positions = max_positions_of(config)
    if positions is not None and length > positions:
        raise ValueError(
            f"{source} holds {length}-token sequences but the model has {positions} positions: use a model with at "
            f"least {length} (e.g. --config_overrides max_position_embeddings={length} for a new model), or data "
            f"built with --max_seq_length {positions}"
        )


def load_model(
    auto_class: Any,
    model_args: Any,
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    model_class: Optional[Any] = None,
    dtype: Optional[Any] = None,
    seed: Optional[int] = None,
) -> Any:
    """The run's model: `--model_name_or_path` loaded as `model_class` (default `auto_class`), else a fresh
    one from `config`. Weights the checkpoint lacks are reported plainly, and the embeddings grow when the
    tokenizer is larger than the vocabulary.

    A fresh model is built right after `set_seed(seed)`, as the original built `auto_class.from_config(config)`
    after seeding: transformers' own initialisation, so the same seed gives the same weights bit for bit,
    whichever of the package's classes (which add no parameters and no initialisation of their own) runs it.

    The weights are float32 whatever dtype the checkpoint was saved in (transformers 5 would otherwise keep a
    bfloat16 checkpoint in bfloat16 and train it without float32 master weights); mixed precision is applied
    by autocast during training. `dtype` (--torch_dtype) asks for another dtype explicitly; "auto" keeps
    the checkpoint's.
    """
    model_class = model_class or auto_class
    if dtype is None:
        dtype = torch_dtype_of(getattr(model_args, "dtype", None) or getattr(model_args, "torch_dtype", None))
    dtype = torch.float32 if dtype is None else dtype
    if getattr(model_args, "low_cpu_mem_usage", False):
        logger.info("--low_cpu_mem_usage: transformers 5 always loads checkpoints without a throwaway copy; nothing to change.")
    if model_args.model_name_or_path:
        model, loading_info = load_local_or_hub(
            "--model_name_or_path", model_args.model_name_or_path,
            lambda local_only: model_class.from_pretrained(
                model_args.model_name_or_path, config=config, dtype=dtype, output_loading_info=True,
                local_files_only=local_only, **_hub_kwargs(model_args),
            ),
        )
        missing = sorted(loading_info.get("missing_keys") or [])
        if missing:
            logger.warning(
                "%s has no weights for %d tensor(s) of %s; they are freshly initialised and trained from scratch: %s",
                model_args.model_name_or_path, len(missing), type(model).__name__, ", ".join(missing),
            )
    else:
        if seed is not None:
            set_seed(seed)
        if model_class is auto_class:
            model = model_class.from_config(config, dtype=dtype,
                                            trust_remote_code=getattr(model_args, "trust_remote_code", False))
        else:
            model = model_class(config)
        if isinstance(dtype, torch.dtype) and model_class is not auto_class:
            model = model.to(dtype)
        logger.info("New %s model: %.1fM parameters.", config.model_type,
                    sum(p.numel() for p in model.parameters()) / 1e6)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        logger.info("Resizing the token embeddings to the tokenizer's %d tokens.", len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    return model


def torch_dtype_of(name: Optional[str]) -> Any:
    """`--torch_dtype`: None, "auto", or a torch dtype name (bfloat16, float16, float32)."""
    if name is None or name == "auto":
        return name
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"--torch_dtype {name!r} is not a torch dtype: use auto, bfloat16, float16 or float32")
    return dtype
