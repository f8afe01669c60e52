#!/usr/bin/env python
"""BERT pretraining (masked-LM + next-sentence prediction) driven by an IPU config, on CPUs and GPUs. It
takes the flags and ipu_config.json files of Graphcore's IPU example and trains on a pre-built pretraining
dataset (the hub's Graphcore/wikipedia-bert-128, or a prepare_dataset.py folder with --dataset_path) or on raw
text turned into sentence pairs here; --output_dir receives the model, the tokenizer, the effective
ipu_config.json, the results and the checkpoints. For example:

    python run_pretraining.py --config_name bert-base-uncased --tokenizer_name bert-base-uncased \\
        --ipu_config_name . --dataset_name Graphcore/wikipedia-bert-128 --do_train --do_eval \\
        --output_dir /tmp/test-pretraining

Data: a pre-built pretraining dataset (columns input_ids, attention_mask, token_type_ids,
next_sentence_label[, labels]) from the hub or a save_to_disk folder, or raw text that is turned
into sentence pairs here.
"""

import logging
import sys
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import transformers
from transformers import AutoModelForPreTraining, default_data_collator, set_seed

from ipu_trainer import (
    DataCollatorForLanguageModelingWithMaxTokensMasked,
    IPUTrainer,
)
from ipu_trainer.cli.datasets import (
    data_source_of,
    eval_held_out_of_train,
    load_raw_datasets,
    require_columns,
    resolve_sequence_length,
    split_source,
    text_column_of,
    train_and_eval_splits,
)
from ipu_trainer.cli.model_loading import (
    check_sequence_length_fits,
    load_ipu_config,
    load_model,
    load_model_config,
    load_tokenizer,
    max_positions_of,
)
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
from ipu_trainer.data.collators import max_num_masked_tokens
from ipu_trainer.data.nsp_pairs import (
    NO_PAIRS_HINT,
    build_nsp_pairs,
    hold_out_nsp_pairs,
    load_text_documents,
    stream_nsp_pairs,
)
from ipu_trainer.data.packing import pack_for_training
from ipu_trainer.data.sources import column_names_of, first_example
from ipu_trainer.models import masked_positions_model_for
from ipu_trainer.run.resolved_run import resolve_run
from ipu_trainer.training.metrics import pretraining_metrics, pretraining_predictions
from ipu_trainer.training.optimizers import get_groupbert_schedule

if not transformers.__version__.startswith("5."):
    raise ImportError(f"transformers 5.x is required, found {transformers.__version__}. To fix: pip install -r requirements.txt")

logger = logging.getLogger(__name__)

PRETRAINING_COLUMNS = ["input_ids", "attention_mask", "token_type_ids", "next_sentence_label"]


@dataclass
class ModelArguments(SharedModelArguments):
    groupbert_schedule: bool = field(
        default=False,
        metadata={"help": "GroupBERT learning-rate schedule: sqrt warmup over warmup_ratio of the steps, then linear decay to 1e-7."},
    )


@dataclass
class DataTrainingArguments(PackingArguments, SharedDataArguments):
    shortest_sequence: ClassVar[int] = 5  # [CLS] A [SEP] B [SEP]

    dataset_path: Optional[str] = field(default=None, metadata={"help": "A folder written by Dataset.save_to_disk (e.g. by prepare_dataset.py)."})
    data_dir: Optional[str] = field(default=None, metadata={"help": "data_dir passed to datasets.load_dataset."})
    is_already_preprocessed: bool = field(
        default=False, metadata={"help": "The data is already tokenized sentence pairs (input_ids ... next_sentence_label)."}
    )
    is_already_masked: bool = field(
        default=False, metadata={"help": "Keep the masking stored in the data (its labels) instead of masking each batch afresh."}
    )
    max_seq_length: Optional[int] = field(
        default=None, metadata={"help": "Sequence length. Default: the data's length, else the tokenizer maximum capped at 1024."}
    )
    mlm_probability: float = field(default=0.15, metadata={"help": "Fraction of tokens masked for the masked-LM loss."})
    line_by_line: bool = field(
        default=False, metadata={"help": "Accepted for compatibility; raw text is always turned into sentence pairs here."}
    )
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Accepted for compatibility; sentence pairs are always padded to max_seq_length."}
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
        if self.whole_word_mask and self.is_already_masked:
            raise ValueError("--whole_word_mask masks each batch afresh, --is_already_masked keeps the data's masking: "
                             "give one of them")


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

    # Data: pre-built sentence pairs are used as they are; raw text becomes sentence pairs.
    # Local files that are not pre-built are read as documents (blank-line separated in txt files).
    file_loader = None if data_args.is_already_preprocessed else load_text_documents
    raw_datasets = load_raw_datasets(data_args, model_args, file_loader=file_loader)
    first_split = next(iter(raw_datasets.values()))
    already_pairs = data_args.is_already_preprocessed or "next_sentence_label" in column_names_of(first_split)
    if already_pairs:
        hint = ("BERT pretraining needs sentence pairs with a next_sentence_label: give raw text (--train_file corpus.txt) "
                "to build them, or build a dataset with prepare_dataset.py.")
        for split in raw_datasets.values():
            require_columns(split, PRETRAINING_COLUMNS + (["labels"] if data_args.is_already_masked else []), hint,
                            data_source_of(data_args))
        data_length = len(first_example(first_split)["input_ids"])
        max_seq_length = data_args.max_seq_length or data_length
        if max_seq_length != data_length:
            raise ValueError(f"--max_seq_length {max_seq_length} does not match the data's sequence length {data_length}")
        check_sequence_length_fits(data_length, config, data_source_of(data_args))
        tokenized_datasets = raw_datasets
    else:
        if data_args.is_already_masked:
            raise ValueError("--is_already_masked needs pre-built, masked data (input_ids ... labels), not raw text.")
        max_seq_length = resolve_sequence_length("--max_seq_length", data_args.max_seq_length, tokenizer, max_positions_of(config))
    if not already_pairs and data_args.streaming:
        # Pairs built block by block as the stream is read. Without validation data, evaluation takes the pairs of the
        # first blocks of documents, and training starts after them (no document in both); evaluation alone takes the
        # first pairs, in train_and_eval_splits
        text_columns = {name: text_column_of(split, split_source(data_args, name)) for name, split in raw_datasets.items()}
        pair_options = dict(tokenizer=tokenizer, max_seq_length=max_seq_length, seed=training_args.seed)
        tokenized_datasets = {name: stream_nsp_pairs(split, text_column=text_columns[name], **pair_options)
                              for name, split in raw_datasets.items()}
        if (eval_held_out_of_train(data_args, training_args, "validation" in raw_datasets) and training_args.do_train
                and "train" in raw_datasets):
            tokenized_datasets["validation"], tokenized_datasets["train"] = hold_out_nsp_pairs(
                raw_datasets["train"], data_args.max_eval_samples, text_column=text_columns["train"],
                source=split_source(data_args, "train"), **pair_options)
    elif not already_pairs:
        with training_args.main_process_first(desc="building sentence pairs"):
            tokenized_datasets = {
                name: build_nsp_pairs(split, tokenizer, max_seq_length,
                                      text_column=text_column_of(split, split_source(data_args, name)),
                                      seed=training_args.seed,
                                      num_proc=data_args.preprocessing_num_workers,
                                      load_from_cache_file=not data_args.overwrite_cache,
                                      source=split_source(data_args, name))
                for name, split in raw_datasets.items()
            }

    empty_hint = NO_PAIRS_HINT if data_args.streaming and not already_pairs else "the data is empty"
    train_dataset, eval_dataset = train_and_eval_splits(tokenized_datasets, training_args, data_args, empty_hint, run)

    # Model: MLM logits only at the masked positions, at most max_num_masked_tokens per sequence (one cap, for the
    # model here and the masking collator below)
    masked_tokens_cap = max_num_masked_tokens(max_seq_length, data_args.mlm_probability)
    config.max_num_masked_tokens = masked_tokens_cap
    model = load_model(AutoModelForPreTraining, model_args, config, tokenizer,
                       model_class=masked_positions_model_for(config), seed=training_args.seed)

    # Masking: dynamic (every batch masked afresh) unless the data's own masking is kept, capped at the model's
    # max_num_masked_tokens (the collator is given the cap, not the length to derive it from again). Sentence pairs
    # all have max_seq_length tokens (built padded to it here; pre-built data comes at one length), so batches are
    # never padded and there is no padding to round up to a multiple of 8 in half precision (pad_to_multiple_of_for).
    if data_args.is_already_masked:
        data_collator = default_data_collator
    else:
        data_collator = DataCollatorForLanguageModelingWithMaxTokensMasked(
            tokenizer=tokenizer, mlm_probability=data_args.mlm_probability, max_num_masked_tokens=masked_tokens_cap,
            seed=training_args.masking_seed, whole_word_mask=data_args.whole_word_mask,
        )

    # Packing (--packing): several sentence pairs per row of max_seq_length, each masked on its own; a micro-batch
    # is a number of packed rows, and max_num_masked_tokens caps the labels of a row (the model's static K)
    if data_args.packing:
        if masked_positions_model_for(config) is None:
            raise ValueError(f"--packing supports BERT models, not model type {config.model_type!r}")
        train_dataset, eval_dataset, data_collator = pack_for_training(
            train_dataset, eval_dataset, max_seq_length, tokenizer.pad_token_id,
            masking=None if data_args.is_already_masked else data_collator, max_num_masked_tokens=masked_tokens_cap,
            max_sequences_per_row=data_args.max_sequences_per_row, seed=training_args.masking_seed,
            placement=run.train_placement,
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
        compute_metrics=pretraining_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=pretraining_predictions if training_args.do_eval else None,
        # Learning-rate schedule: --lr_scheduler_type, or the GroupBERT schedule (same warmup steps)
        scheduler_factory=get_groupbert_schedule if model_args.groupbert_schedule else None,
    )

    # Train, evaluate, write results (or only compile, with --compile_only)
    train_evaluate_and_report(
        trainer, training_args, model_args, data_args, claim, train_dataset, eval_dataset, tasks="fill-mask"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
