"""Command-line arguments the three example scripts share, and how they are parsed."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from transformers import HfArgumentParser

from .data import data_files_of
from .training_args import IPUTrainingArguments


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to start from. Each script adds its own fields to these."""

    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Checkpoint to start from (hub id or folder). Leave unset to train from scratch."}
    )
    model_type: Optional[str] = field(
        default=None,
        metadata={"help": "Model type of a model trained from scratch, e.g. bert, roberta, distilbert, albert, gpt2."},
    )
    config_overrides: Optional[str] = field(
        default=None,
        metadata={"help": 'Override model config values, e.g. "hidden_size=1024,num_attention_heads=16,num_hidden_layers=48".'},
    )
    config_name: Optional[str] = field(default=None, metadata={"help": "Config name or path if not the same as the model."})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer name or path if not the same as the model."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where to store models and data downloaded from the hub."})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Use a fast (tokenizers-backed) tokenizer."})
    model_revision: str = field(default="main", metadata={"help": "Model version: a branch name, tag or commit id."})
    use_auth_token: bool = field(default=False, metadata={"help": "Use the token from `hf auth login` (private models)."})


def parse_script_args(model_arguments: type, data_arguments: type) -> tuple[Any, Any, IPUTrainingArguments]:
    """(model, data, training) arguments from the command line, or from a .json file given as the only argument."""
    parser = HfArgumentParser((model_arguments, data_arguments, IPUTrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses()


@dataclass
class DataArguments:
    """Where the data comes from and how much of it to use. Each script adds its own fields to these."""

    dataset_name: Optional[str] = field(default=None, metadata={"help": "Dataset on the hub, e.g. wikitext."})
    dataset_config_name: Optional[str] = field(
        default=None, metadata={"help": "The dataset's configuration, e.g. wikitext-2-raw-v1."}
    )
    train_file: Optional[str] = field(default=None, metadata={"help": "Training data: a csv, json or txt file."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Evaluation data: a csv, json or txt file."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Redo preprocessing instead of using the datasets cache."})
    validation_split_percentage: Optional[int] = field(
        default=5, metadata={"help": "Percent of train used for evaluation when the data has no validation split."}
    )
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "Processes for preprocessing."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many training samples."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many evaluation samples."})

    # The shortest --max_seq_length / --block_size a script can use (run_pretraining needs [CLS] A [SEP] B [SEP]).
    shortest_sequence: ClassVar[int] = 1

    def __post_init__(self):
        sources = (self.dataset_name, getattr(self, "dataset_path", None), self.train_file, self.validation_file)
        if not any(sources):
            folder = ", --dataset_path (a save_to_disk folder)" if hasattr(self, "dataset_path") else ""
            raise ValueError(f"Need data: --dataset_name{folder}, or --train_file/--validation_file (csv, json or txt).")
        self._check_ranges()
        # Local data must exist (and be of a type the scripts read) before anything else is loaded.
        data_files_of(self)
        dataset_path = getattr(self, "dataset_path", None)
        if dataset_path is not None and not os.path.isdir(dataset_path):
            raise FileNotFoundError(f"--dataset_path {dataset_path}: no such folder (expected a Dataset.save_to_disk folder)")

    def _check_ranges(self) -> None:
        """Numeric flags out of range, refused before anything is loaded (the scripts' own fields included)."""
        for name in ("max_seq_length", "block_size"):
            value = getattr(self, name, None)
            if value is not None and value < self.shortest_sequence:
                raise ValueError(f"--{name}={value} is invalid: must be >= {self.shortest_sequence} (e.g. 128)")
        for name in ("max_train_samples", "max_eval_samples", "preprocessing_num_workers"):
            value = getattr(self, name, None)
            if value is not None and value < 1:
                raise ValueError(f"--{name}={value} is invalid: must be >= 1 (or left out)")
        percentage = self.validation_split_percentage
        if percentage is not None and not 0 <= percentage < 100:
            raise ValueError(f"--validation_split_percentage={percentage} is invalid: must be in [0, 100)")
