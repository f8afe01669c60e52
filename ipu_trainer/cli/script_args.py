"""Command-line arguments the three example scripts share, and how they are parsed."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from transformers import HfArgumentParser, TrainingArguments

from ..run.pipeline_layout import refuse_with_pipeline
from ..run.training_args import IPUTrainingArguments
from .datasets import data_files_of, eval_held_out_of_train


WEIGHT_DTYPES = ("auto", "bfloat16", "float16", "float32")


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
    token: Optional[str] = field(
        default=None,
        metadata={"help": "Hub token for private models and datasets (default: the one `hf auth login` saved, when "
                  "--use_auth_token is given)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow config, tokenizer and model classes defined by code in their hub repository; that code "
                  "runs on this machine, so only for repositories you trust."},
    )
    torch_dtype: Optional[str] = field(
        default=None,
        metadata={"help": "Load the model's weights in this dtype (auto: the checkpoint's own). Default float32: mixed "
                  "precision during training is autocast (see --fp32), on float32 weights.",
                  "choices": list(WEIGHT_DTYPES)},
    )
    dtype: Optional[str] = field(
        default=None, metadata={"help": "transformers 5's name for --torch_dtype.", "choices": list(WEIGHT_DTYPES)}
    )

    def __post_init__(self):
        if self.torch_dtype and self.dtype and self.torch_dtype != self.dtype:
            raise ValueError(f"--torch_dtype {self.torch_dtype} and --dtype {self.dtype} disagree: give one of them")


# The inherited transformers flags a run of these scripts usually needs (every one README's quick starts use
# among them); --help lists them after the script's own flags and the IPU flags, and --help-all lists every one of
# the ~150 TrainingArguments flags.
COMMON_TRAINING_FLAGS = (
    "output_dir", "overwrite_output_dir", "do_train", "do_eval", "eval_on_start", "max_steps", "num_train_epochs",
    "per_device_train_batch_size", "per_device_eval_batch_size", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "seed",
    "logging_steps", "eval_strategy", "eval_steps", "save_strategy", "save_steps", "save_total_limit",
    "resume_from_checkpoint", "dataloader_num_workers", "dataloader_drop_last", "report_to", "disable_tqdm",
    "torch_compile", "fp16", "bf16", "gradient_checkpointing", "log_level",
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default in its help (as HfArgumentParser shows them), and the description printed as written,
    so the example command keeps its lines."""


def help_header(doc: str) -> str:
    """The opening of a script's --help, from its docstring: the description paragraph and the example command
    (the docstring up to the end of its first indented block)."""
    blocks = doc.strip("\n").split("\n\n")
    for end, block in enumerate(blocks):
        if block.startswith((" ", "\t")):
            return "\n\n".join(blocks[: end + 1])
    return blocks[0]


# argparse's message for a value its type rejects, e.g. "invalid int value: 'x'" (after "argument --max_steps: ").
_INVALID_VALUE = re.compile(r"invalid (?P<kind>int|float) value: (?P<value>.*)$")
_EXPECTED = {"int": "a whole number", "float": "a number"}


class CommandLineParser(argparse.ArgumentParser):
    """The scripts' argparse: `--help` opens with the description, and errors are one line.

    - argparse puts the description under the usage block (20 lines of flags for these scripts); here it comes
      first, so the help starts with what the script does and an example.
    - An error is a ValueError, which `startup.run_cli` prints as one `error:` line naming the flag (exit code
      2). argparse itself prints its usage block first, 160 lines for the ~200 flags of the training scripts,
      above a message that then scrolls out of sight."""

    def format_help(self) -> str:
        description, self.description = self.description, None
        try:
            text = super().format_help()
        finally:
            self.description = description
        return f"{description}\n\n{text}" if description else text

    def error(self, message: str) -> typing.NoReturn:
        subject, _, problem = message.partition(": ")
        if not (subject.startswith("argument ") and problem):  # not about one flag, e.g. a required one missing
            raise ValueError(f"{message} (--help lists the flags)")
        flag = subject.removeprefix("argument ").split("/")[0]  # argparse names a flag by all its spellings, "--a/--b"
        match = _INVALID_VALUE.match(problem)
        if match is None:
            raise ValueError(f"{flag}: {problem}")
        default = getattr(self._option_string_actions.get(flag), "default", None)
        example = f", e.g. {flag} {default}" if isinstance(default, (int, float)) and default > 0 else ""
        raise ValueError(f"{flag} {match['value']}: expected {_EXPECTED[match['kind']]}{example}")


class ScriptArgumentParser(CommandLineParser, HfArgumentParser):
    """The training scripts' HfArgumentParser: `CommandLineParser`'s help and errors, each flag's default in its help."""

    def __init__(self, dataclass_types: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(dataclass_types, **kwargs)


def _subset_dataclass(name: str, source: type, names: list[str]) -> type:
    """A dataclass holding `source`'s fields `names` (their types, defaults and help), for a help section."""
    types = typing.get_type_hints(source)  # resolved in the module of the class that declared each field
    spec = [(f.name, types[f.name], dataclasses.field(default=f.default, metadata=f.metadata))
            for f in dataclasses.fields(source) if f.name in names]
    return dataclasses.make_dataclass(name, spec)


def short_help(model_arguments: type, data_arguments: type, description: Optional[str] = None) -> str:
    """--help: the script's description and example (`help_header` of `description`, its docstring), its own
    flags, the IPU flags and the common training flags, then where the rest are."""
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [f.name for f in dataclasses.fields(IPUTrainingArguments)
           if f.name not in inherited or f.name in IPUTrainingArguments.__dict__.get("__annotations__", {})]
    common = [name for name in COMMON_TRAINING_FLAGS if name not in own]
    sections = [
        ("", ScriptArgumentParser((model_arguments, data_arguments), description=description)),
        ("IPU flags (IPUTrainingArguments):", HfArgumentParser(_subset_dataclass("IPU", IPUTrainingArguments, own))),
        ("Common training flags (transformers.TrainingArguments):",
         HfArgumentParser(_subset_dataclass("Training", IPUTrainingArguments, common))),
    ]
    parts = []
    for title, parser in sections:
        text = parser.format_help()
        if title:  # drop the usage line and the "options:" heading of the sub-parsers
            text = title + "\n" + text.split("options:\n", 1)[1].split("\n", 1)[1]
        parts.append(text.replace(os.path.basename(sys.argv[0] or "script"), os.path.basename(sys.argv[0])))
    total = len(dataclasses.fields(IPUTrainingArguments))
    parts.append(f"{total - len(own) - len(common)} more transformers.TrainingArguments flags: --help-all lists every flag.")
    return "\n".join(parts)


def parse_script_args(
    model_arguments: type, data_arguments: type, doc: Optional[str] = None
) -> tuple[Any, Any, IPUTrainingArguments]:
    """(model, data, training) arguments from the command line, or from a .json file given as the only argument.

    `--help` opens with the description and example of `doc` (the script's docstring, see `help_header`), then
    lists the script's flags, the IPU flags and the common training flags; `--help-all` all of them. A value
    argparse refuses is one ValueError naming the flag (`CommandLineParser`).
    """
    description = help_header(doc) if doc else None
    parser = ScriptArgumentParser((model_arguments, data_arguments, IPUTrainingArguments), description=description)
    argv = sys.argv[1:]
    if "--help-all" in argv:
        parser.print_help()
        raise SystemExit(0)
    if "-h" in argv or "--help" in argv:
        print(short_help(model_arguments, data_arguments, description))
        raise SystemExit(0)
    if argv and argv[0].endswith(".json"):
        if len(argv) > 1:
            raise ValueError(
                f"{argv[0]} holds the arguments, and {' '.join(argv[1:])} was given after it: put every argument in the "
                "json file, or give them all on the command line"
            )
        parsed = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        parsed = parser.parse_args_into_dataclasses()
    check_streaming_args(parsed[1], parsed[2])
    return parsed


def check_pipeline_args(data_args: Any, training_args: Any) -> None:
    """What --pipeline cannot take from a script's data flags, refused before anything is written or loaded: packed
    rows (the stages take unpacked ones), and lines padded to their batch's longest (torch's pipeline stages size
    their buffers from the first step, so a longer later batch would break the run)."""
    if not getattr(training_args, "pipeline", None):
        return
    if getattr(data_args, "packing", False):
        raise refuse_with_pipeline("--packing", "the stages take unpacked rows; leave out --packing")
    if getattr(data_args, "line_by_line", False) and not getattr(data_args, "pad_to_max_length", False):
        raise refuse_with_pipeline("--line_by_line batches padded to their longest line",
                                   "the stages need one sequence length; add --pad_to_max_length")


def check_streaming_args(data_args: Any, training_args: Any) -> None:
    """What --streaming needs from the other flags, refused before anything is loaded: a stream has no length, so
    training needs --max_steps, and evaluation without validation data needs --max_eval_samples (the rows held out,
    `eval_held_out_of_train`). Local files say here whether there is validation data; whether a hub dataset or a
    --dataset_path folder has a validation split is known once it is opened (`train_and_eval_splits` asks then)."""
    if not getattr(data_args, "streaming", False):
        return
    if training_args.do_train and training_args.max_steps <= 0:
        raise ValueError(
            "--streaming with --do_train needs --max_steps N (> 0): a stream has no length, so the number of steps "
            "cannot come from --num_train_epochs"
        )
    if data_args.train_file is not None:
        eval_held_out_of_train(data_args, training_args, has_validation=data_args.validation_file is not None)


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
    streaming: bool = field(
        default=False,
        metadata={"help": "Read the data as a stream (hub datasets and local files), preprocessed on the fly as it is "
                  "trained on: nothing is downloaded or written in advance. Needs --max_steps; the stream is read in "
                  "order and starts again when it ends. Evaluation without validation data holds out the first "
                  "--max_eval_samples samples."},
    )

    # The shortest --max_seq_length / --block_size a script can use (run_pretraining needs [CLS] A [SEP] B [SEP]).
    shortest_sequence: ClassVar[int] = 1

    def __post_init__(self):
        sources = (self.dataset_name, getattr(self, "dataset_path", None), self.train_file, self.validation_file)
        if not any(sources):
            folder = ", --dataset_path (a save_to_disk folder)" if hasattr(self, "dataset_path") else ""
            raise ValueError(f"Need data: --dataset_name{folder}, or --train_file/--validation_file (csv, json or txt).")
        files = [f"--{name}" for name in ("train_file", "validation_file") if getattr(self, name)]
        dataset = next((f"--{name}" for name in ("dataset_name", "dataset_path") if getattr(self, name, None)), None)
        if files and dataset:  # the files would not be read: say so rather than train or evaluate on other data
            raise ValueError(
                f"{' and '.join(files)} would be ignored with {dataset}: give one source of data "
                "(prepare_dataset.py --validation_file adds a validation split to a prepared dataset)"
            )
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
        if self.packing and getattr(self, "streaming", False):
            raise ValueError(
                "--packing chooses which sequences share a row from the lengths of the whole dataset, which a stream "
                "does not have: leave out --streaming or --packing"
            )
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
