"""Command-line arguments the three example scripts share, and how they are parsed."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from transformers import HfArgumentParser

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

    def __post_init__(self):
        sources = (self.dataset_name, getattr(self, "dataset_path", None), self.train_file, self.validation_file)
        if not any(sources):
            folder = ", --dataset_path (a save_to_disk folder)" if hasattr(self, "dataset_path") else ""
            raise ValueError(f"Need data: --dataset_name{folder}, or --train_file/--validation_file (csv, json or txt).")


@dataclass
class PackingArguments:
    """`--packing` for the masked-LM scripts (run_pretraining.py, run_mlm.py --line_by_line)."""

    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack several sequences into each row of max_seq_length so no compute is spent on padding "
            "(attention stays inside each sequence, positions restart, NSP runs at each [CLS]). A micro-batch "
            "is then a number of packed rows: each weight update sees more sequences (the log states how many)."
        },
    )
    max_sequences_per_row: Optional[int] = field(
        default=None, metadata={"help": "With --packing: at most this many sequences in one row. Default: no limit."}
    )

    def __post_init__(self):
        if self.max_sequences_per_row is not None and self.max_sequences_per_row < 1:
            raise ValueError(f"--max_sequences_per_row={self.max_sequences_per_row} is invalid: must be >= 1")
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
