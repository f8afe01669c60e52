#!/usr/bin/env python
"""Causal-language-model fine-tuning and training (GPT-2 and any causal LM the Auto classes build) driven
by an IPU config, on CPUs and GPUs. It takes the flags and ipu_config.json files of Graphcore's IPU example,
trains on a hub dataset or local csv, json or txt files, and writes the model, the tokenizer, the effective
ipu_config.json, the results and the checkpoints to --output_dir. For example:

    python run_clm.py --model_name_or_path gpt2 --ipu_config_name Graphcore/gpt2-small-ipu \\
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 --do_train --do_eval \\
        --output_dir /tmp/clm_gpt2

Texts are concatenated and cut into block_size blocks; the model predicts each next token. GPT-2 keeps its
LM head tied to the token embedding, also when the IPU config computes the projection in chunks.
"""

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import transformers
from datasets import DatasetDict
from transformers import AutoModelForCausalLM, default_data_collator, set_seed

from ipu_trainer import IPUTrainer
from ipu_trainer.cli.datasets import (
    load_raw_datasets,
    resolve_sequence_length,
    text_blocks,
    train_and_eval_splits,
)
from ipu_trainer.cli.model_loading import (
    load_ipu_config,
    load_model,
    load_model_config,
    load_tokenizer,
    max_positions_of,
)
from ipu_trainer.cli.script_args import DataArguments as SharedDataArguments
from ipu_trainer.cli.script_args import ModelArguments as SharedModelArguments
from ipu_trainer.cli.script_args import parse_script_args
from ipu_trainer.cli.startup import (
    check_outputs_before_loading,
    claim_output_dir,
    run_cli,
    setup_logging,
    train_evaluate_and_report,
)
from ipu_trainer.models import causal_lm_model_for
from ipu_trainer.run.resolved_run import resolve_run
from ipu_trainer.training.metrics import AccuracyMetric, causal_lm_predictions, token_accuracy_metrics

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
class DataTrainingArguments(SharedDataArguments):
    block_size: Optional[int] = field(
        default=None,
        metadata={"help": "Tokens per training sample after concatenating the texts. Default: the tokenizer maximum capped at 1024 "
                  "(and at the model's positions); larger than the model's positions is an error."},
    )
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep the line breaks of txt files in the text."})


# ---- Text to token blocks --------------------------------------------------------------------------------


def tokenize_for_causal_lm(
    raw: DatasetDict,
    tokenizer: Any,
    block_size: int,
    num_proc: Optional[int] = None,
    overwrite_cache: bool = False,
) -> DatasetDict:
    """Text to `block_size` token blocks for causal-LM training, labels = input_ids (the model shifts them).

    All texts are tokenized, concatenated and cut into blocks, the remainder dropped, as in the Hugging
    Face run_clm.py; line breaks are whatever the loader kept (`--keep_linebreaks`).
    """
    return text_blocks(raw, tokenizer, block_size, num_proc, overwrite_cache, with_labels=True)


def main():
    # Arguments and logging
    model_args, data_args, training_args = parse_script_args(ModelArguments, DataTrainingArguments, __doc__)
    setup_logging(training_args)
    check_outputs_before_loading(training_args)
    claim = claim_output_dir(training_args, model_args, data_args)
    set_seed(training_args.seed)

    # Model config and IPU config, resolved into the run before any weights or data are loaded
    config = load_model_config(model_args)
    run = resolve_run(load_ipu_config(training_args, model_args.model_name_or_path), training_args, config)
    tokenizer = load_tokenizer(model_args)

    # Data: all texts concatenated and cut into block_size blocks; labels are the inputs (shifted in the model)
    block_size = resolve_sequence_length("--block_size", data_args.block_size, tokenizer, max_positions_of(config))
    raw_datasets = load_raw_datasets(data_args, model_args, text_builder_kwargs={"keep_linebreaks": data_args.keep_linebreaks})
    with training_args.main_process_first(desc="tokenizing the dataset"):
        lm_datasets = tokenize_for_causal_lm(
            raw_datasets, tokenizer, block_size,
            num_proc=data_args.preprocessing_num_workers, overwrite_cache=data_args.overwrite_cache,
        )
    too_short = f"the text is empty or shorter than one block of {block_size} tokens (try a smaller --block_size)"
    train_dataset, eval_dataset = train_and_eval_splits(lm_datasets, training_args, data_args, too_short, run)

    # Model: GPT-2 gets recomputation and a chunked (still tied) LM head from the IPU config
    model = load_model(AutoModelForCausalLM, model_args, config, tokenizer,
                       model_class=causal_lm_model_for(config), seed=training_args.seed)

    # Trainer
    trainer = IPUTrainer(
        model=model,
        args=training_args,
        run=run,
        data_collator=default_data_collator,  # blocks of block_size tokens: no padding to round up to a multiple of 8
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        compute_metrics=token_accuracy_metrics(AccuracyMetric(model_args.cache_dir)) if training_args.do_eval else None,
        preprocess_logits_for_metrics=causal_lm_predictions if training_args.do_eval else None,
    )

    # Train, evaluate, write results (or only compile, with --compile_only)
    train_evaluate_and_report(
        trainer, training_args, model_args, data_args, claim, train_dataset, eval_dataset, tasks="text-generation"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
