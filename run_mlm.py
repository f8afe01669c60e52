#!/usr/bin/env python
"""Masked-language-model fine-tuning and training (BERT, RoBERTa, DistilBERT, ALBERT...) driven by an
IPU config, on CPUs and GPUs. It takes the flags and ipu_config.json files of Graphcore's IPU example, trains
on a hub dataset or local csv, json or txt files, and writes the model, the tokenizer, the effective
ipu_config.json, the results and the checkpoints to --output_dir. For example:

    python run_mlm.py --model_name_or_path roberta-base --ipu_config_name Graphcore/roberta-base-ipu \\
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 --do_train --do_eval \\
        --output_dir /tmp/mlm_output

Text is either tokenized line by line (--line_by_line) or concatenated and cut into max_seq_length
blocks. Every batch is masked afresh with at most max_num_masked_tokens masks per sequence; BERT and
RoBERTa compute the MLM head only at those positions.
"""

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import transformers
from datasets import DatasetDict
from transformers import AutoModelForMaskedLM, set_seed

from ipu_trainer import DataCollatorForLanguageModelingWithMaxTokensMasked, IPUTrainer
from ipu_trainer.cli.datasets import (
    load_raw_datasets,
    pad_lines_to_max_length,
    resolve_sequence_length,
    text_and_other_columns,
    text_blocks,
    train_and_eval_splits,
)
from ipu_trainer.cli.model_loading import load_ipu_config, load_model, load_model_config, load_tokenizer, max_positions_of
from ipu_trainer.cli.script_args import DataArguments as SharedDataArguments
from ipu_trainer.cli.script_args import ModelArguments as SharedModelArguments
from ipu_trainer.cli.script_args import PackingArguments, check_pipeline_args, parse_script_args
from ipu_trainer.cli.startup import (
    check_outputs_before_loading,
    claim_output_dir,
    run_cli,
    setup_logging,
    train_evaluate_and_report,
)
from ipu_trainer.data.collators import max_num_masked_tokens, pad_to_multiple_of_for
from ipu_trainer.data.packing import pack_for_training
from ipu_trainer.data.sources import map_data
from ipu_trainer.models import masked_lm_model_for
from ipu_trainer.run.resolved_run import resolve_run
from ipu_trainer.training.metrics import AccuracyMetric, masked_lm_predictions, token_accuracy_metrics

if not transformers.__version__.startswith("5."):
    raise ImportError(f"transformers 5.x is required, found {transformers.__version__}. To fix: pip install -r requirements.txt")

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments(SharedModelArguments):
    low_cpu_mem_usage: bool = field(
        default=False,
        metadata={"help": "Accepted for compatibility: transformers 5 always loads checkpoints without an extra copy in memory."},
    )


@dataclass
class DataTrainingArguments(PackingArguments, SharedDataArguments):
    max_seq_length: Optional[int] = field(
        default=None,
        metadata={"help": "Sequence length after tokenization. Default: the tokenizer maximum capped at 1024 (and at the model's positions)."},
    )
    mlm_probability: float = field(default=0.15, metadata={"help": "Fraction of tokens masked for the masked-LM loss."})
    line_by_line: bool = field(
        default=False,
        metadata={"help": "Each non-empty line of text is one sample. Otherwise texts are concatenated and cut into max_seq_length blocks."},
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "With --line_by_line, pad every sample to max_seq_length. Otherwise batches are padded to their longest sample."},
    )
    whole_word_mask: bool = field(
        default=False,
        metadata={"help": "Mask whole words (all pieces of a word together, 80/10/10 per word) instead of single tokens, "
                  "still at most max_num_masked_tokens tokens per sequence. Words: WordPiece ## pieces, Ġ/▁ word starts."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"--mlm_probability={self.mlm_probability} is invalid: must be between 0 and 1")
        if self.packing and not self.line_by_line:
            raise ValueError("--packing needs --line_by_line: concatenated text is already cut into full rows, with no padding to remove")


# ---- Text to token blocks --------------------------------------------------------------------------------


def tokenize_for_masked_lm(
    raw: DatasetDict,
    tokenizer: Any,
    max_seq_length: int,
    line_by_line: bool,
    pad_to_max_length: bool,
    num_proc: Optional[int] = None,
    overwrite_cache: bool = False,
) -> DatasetDict:
    """Text to token blocks for masked-LM training.

    `line_by_line`: each non-empty line is one sample, truncated to `max_seq_length` (padded only with
    `pad_to_max_length`). Otherwise all texts are concatenated and cut into `max_seq_length` blocks, the
    remainder dropped. Special-token masks are kept so masking never picks [CLS]/[SEP].
    """
    if line_by_line:
        column, remove = text_and_other_columns(raw)
        padding = "max_length" if pad_to_max_length else False

        def tokenize_lines(examples):
            lines = [line for line in examples[column] if line and not line.isspace()]
            # Fast tokenizers fail on an empty batch; tokenize a stand-in to get the columns, then keep no rows.
            encoded = tokenizer(
                lines or [""], padding=padding, truncation=True, max_length=max_seq_length, return_special_tokens_mask=True
            )
            return encoded if lines else {key: [] for key in encoded}

        return map_data(
            raw, tokenize_lines, num_proc, overwrite_cache, "Tokenizing lines", batched=True, remove_columns=remove,
        )

    return text_blocks(raw, tokenizer, max_seq_length, num_proc, overwrite_cache, return_special_tokens_mask=True)


def main():
    # Arguments and logging
    model_args, data_args, training_args = parse_script_args(ModelArguments, DataTrainingArguments, __doc__)
    setup_logging(training_args)
    check_pipeline_args(data_args, training_args)  # before anything is written or loaded
    check_outputs_before_loading(training_args)
    claim = claim_output_dir(training_args, model_args, data_args)
    set_seed(training_args.seed)

    # Model config and IPU config, resolved into the run before any weights or data are loaded
    config = load_model_config(model_args)
    run = resolve_run(load_ipu_config(training_args, model_args.model_name_or_path), training_args, config)
    tokenizer = load_tokenizer(model_args)
    if tokenizer.mask_token is None:
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no mask token, so it cannot be used for masked-LM training")

    # Data: line by line, or concatenated and cut into max_seq_length blocks
    raw_datasets = load_raw_datasets(data_args, model_args)
    max_seq_length = resolve_sequence_length("--max_seq_length", data_args.max_seq_length, tokenizer, max_positions_of(config))
    with training_args.main_process_first(desc="tokenizing the dataset"):
        tokenized_datasets = tokenize_for_masked_lm(
            raw_datasets, tokenizer, max_seq_length, data_args.line_by_line,
            pad_lines_to_max_length(data_args, training_args.world_size),
            num_proc=data_args.preprocessing_num_workers, overwrite_cache=data_args.overwrite_cache,
        )
    too_short = "the text is empty or shorter than one max_seq_length block (try --line_by_line or a smaller --max_seq_length)"
    train_dataset, eval_dataset = train_and_eval_splits(tokenized_datasets, training_args, data_args, too_short, run)

    # Model: BERT and RoBERTa compute the MLM head only at the (at most max_num_masked_tokens) masked positions (one
    # cap, for the model here and the masking collator below)
    masked_tokens_cap = max_num_masked_tokens(max_seq_length, data_args.mlm_probability)
    config.max_num_masked_tokens = masked_tokens_cap
    model_class = masked_lm_model_for(config)
    if model_class is None:
        logger.info("No masked-position head for model type %r: the MLM head runs on every position.", config.model_type)
    model = load_model(AutoModelForMaskedLM, model_args, config, tokenizer, model_class=model_class, seed=training_args.seed)

    # Dynamic masking, capped at max_num_masked_tokens per sequence (the collator is given the cap, not the length to
    # derive it from again); seeded so runs (and evaluations) repeat. Dynamically padded batches (--line_by_line) are
    # rounded up to a multiple of 8 in half precision on a GPU, never past max_seq_length.
    data_collator = DataCollatorForLanguageModelingWithMaxTokensMasked(
        tokenizer=tokenizer, mlm_probability=data_args.mlm_probability, max_num_masked_tokens=masked_tokens_cap,
        whole_word_mask=data_args.whole_word_mask,
        pad_to_multiple_of=pad_to_multiple_of_for(run, max_seq_length),
        seed=training_args.masking_seed,
    )

    # Packing (--packing, with --line_by_line): several lines per row of max_seq_length, each masked on its own;
    # a micro-batch is a number of packed rows, and max_num_masked_tokens caps the labels of a row
    if data_args.packing:
        if model_class is None:
            raise ValueError(f"--packing supports BERT and RoBERTa models, not model type {config.model_type!r}")
        train_dataset, eval_dataset, data_collator = pack_for_training(
            train_dataset, eval_dataset, max_seq_length, tokenizer.pad_token_id, masking=data_collator,
            max_num_masked_tokens=masked_tokens_cap, max_sequences_per_row=data_args.max_sequences_per_row,
            seed=data_collator.seed, placement=run.train_placement,
        )

    # Trainer
    trainer = IPUTrainer(
        model=model,
        args=training_args,
        run=run,
        data_collator=data_collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        compute_metrics=token_accuracy_metrics(AccuracyMetric(model_args.cache_dir)) if training_args.do_eval else None,
        preprocess_logits_for_metrics=masked_lm_predictions if training_args.do_eval else None,
    )

    # Train, evaluate, write results (or only compile, with --compile_only)
    train_evaluate_and_report(
        trainer, training_args, model_args, data_args, claim, train_dataset, eval_dataset, tasks="fill-mask"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
