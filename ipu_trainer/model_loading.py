"""Config, tokenizer and IPU config resolution shared by the three example scripts."""

from __future__ import annotations

import logging
from typing import Any, Optional

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
    """The run's IPU config file, from --ipu_config_name or the model's folder. The trainer applies the
    command-line overrides and --n_ipu to it."""
    name = training_args.ipu_config_name or model_name_or_path
    if not name:
        raise ValueError(
            "You must provide an IPUConfig: pass --ipu_config_name (a folder with ipu_config.json, a .json file, "
            "or a hub id such as Graphcore/bert-base-ipu), e.g. --ipu_config_name . for the one next to the scripts."
        )
    return IPUConfig.from_pretrained(name)
