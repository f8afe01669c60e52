"""Config, tokenizer and IPU config resolution shared by the three example scripts."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from transformers import CONFIG_MAPPING, AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from .ipu_config import IPUConfig
from .training_args import IPUTrainingArguments

logger = logging.getLogger(__name__)


def _hub_kwargs(model_args: Any) -> dict[str, Any]:
    token = getattr(model_args, "use_auth_token", False)
    return {
        "cache_dir": getattr(model_args, "cache_dir", None),
        "revision": getattr(model_args, "model_revision", "main"),
        "token": True if token is True else (token or None),
    }


def load_model_config(model_args: Any) -> PretrainedConfig:
    """`--config_name`, else `--model_name_or_path`, else a fresh config of `--model_type`; then
    `--config_overrides`."""
    if model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name, **_hub_kwargs(model_args))
    elif model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, **_hub_kwargs(model_args))
    elif model_args.model_type:
        if model_args.model_type not in CONFIG_MAPPING:
            raise ValueError(
                f"--model_type {model_args.model_type!r} is not a model type. Valid model types include: "
                f"{_common_model_types()} (all {len(CONFIG_MAPPING)} are listed in transformers.CONFIG_MAPPING). To start from a named checkpoint's architecture use "
                f"--config_name {model_args.model_type} instead."
            )
        config = CONFIG_MAPPING[model_args.model_type]()
        logger.warning("Training a new %s model from scratch.", model_args.model_type)
    else:
        raise ValueError("No model given: pass --model_name_or_path, --config_name or --model_type.")

    if model_args.config_overrides:
        logger.info("Overriding config: %s", model_args.config_overrides)
        try:
            config.update_from_string(model_args.config_overrides)
        except ValueError as error:
            raise ValueError(f"--config_overrides {model_args.config_overrides!r}: {error}") from None
    return config


def _common_model_types() -> str:
    common = ["albert", "bert", "distilbert", "gpt2", "gpt_neo", "llama", "roberta", "xlm-roberta"]
    return ", ".join(t for t in common if t in CONFIG_MAPPING)


def load_tokenizer(model_args: Any) -> PreTrainedTokenizerBase:
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if not name:
        raise ValueError(
            "No tokenizer given: this script does not train tokenizers. Pass --tokenizer_name (a folder saved with "
            "save_pretrained or a hub id); to build one offline see make_quickstart_assets.py."
        )
    return AutoTokenizer.from_pretrained(name, use_fast=model_args.use_fast_tokenizer, **_hub_kwargs(model_args))


def load_ipu_config(training_args: IPUTrainingArguments, model_name_or_path: Optional[str]) -> IPUConfig:
    """The IPU config file of the run: --ipu_config_name, else the one stored with --model_name_or_path, with
    per-POD-type values picked for --pod_type. The command line is applied to it once, by `resolve_run`."""
    name = training_args.ipu_config_name or model_name_or_path
    if not name:
        raise ValueError(
            "You must provide an IPUConfig: pass --ipu_config_name (a folder with ipu_config.json, a .json file, "
            "or a hub id such as Graphcore/bert-base-ipu), e.g. --ipu_config_name . for the one next to the scripts."
        )
    return IPUConfig.from_pretrained(name, pod_type=training_args.pod_type)


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


def load_model(
    auto_class: Any,
    model_args: Any,
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    model_class: Optional[Any] = None,
    dtype: Optional[Any] = None,
) -> Any:
    """The run's model: `--model_name_or_path` loaded as `model_class` (default `auto_class`), else a fresh
    one from `config`. Weights the checkpoint lacks are reported plainly, and the embeddings grow when the
    tokenizer is larger than the vocabulary.

    The weights are float32 whatever dtype the checkpoint was saved in (transformers 5 would otherwise keep a
    bfloat16 checkpoint in bfloat16 and train it without float32 master weights); mixed precision is applied
    by autocast during training. `dtype` (--torch_dtype) asks for another dtype explicitly; "auto" keeps
    the checkpoint's.
    """
    model_class = model_class or auto_class
    dtype = torch.float32 if dtype is None else dtype
    if getattr(model_args, "low_cpu_mem_usage", False):
        logger.info("--low_cpu_mem_usage: transformers 5 always loads checkpoints without a throwaway copy; nothing to change.")
    if model_args.model_name_or_path:
        model, loading_info = model_class.from_pretrained(
            model_args.model_name_or_path, config=config, dtype=dtype, output_loading_info=True,
            **_hub_kwargs(model_args),
        )
        missing = sorted(loading_info.get("missing_keys") or [])
        if missing:
            logger.warning(
                "%s has no weights for %d tensor(s) of %s; they are freshly initialised and trained from scratch: %s",
                model_args.model_name_or_path, len(missing), type(model).__name__, ", ".join(missing),
            )
    else:
        model = model_class.from_config(config, dtype=dtype) if model_class is auto_class else model_class(config)
        if isinstance(dtype, torch.dtype) and model_class is not auto_class:
            model = model.to(dtype)
        logger.info("New %s model from scratch: %.1fM parameters.", config.model_type,
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
