#!/usr/bin/env python
"""BERT pretraining (MLM + NSP) in the style of optimum-graphcore 0.7's run_pretraining.py (see README.md)."""

import functools
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Optional

import datasets
import transformers
from datasets import load_from_disk
from torch.optim.lr_scheduler import LambdaLR
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForPreTraining,
    AutoTokenizer,
    HfArgumentParser,
    default_data_collator,
    set_seed,
)
from transformers.utils import check_min_version

# transformers 5: `send_example_telemetry` no longer exists, so it is neither imported nor called.

from optimum.graphcore import IPUConfig, IPUTrainer
from optimum.graphcore import IPUTrainingArguments as TrainingArguments
from optimum.graphcore.data import DataCollatorForLanguageModelingWithMaxTokensMasked, pad_on_batch_axis
from optimum.graphcore.utils import check_min_version as gc_check_min_version


check_min_version("4.29.0")
gc_check_min_version("0.6.0.dev0")

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None)
    model_type: Optional[str] = field(default=None)
    config_overrides: Optional[str] = field(default=None)
    config_name: Optional[str] = field(default=None)
    tokenizer_name: Optional[str] = field(default=None)
    cache_dir: Optional[str] = field(default=None)
    model_revision: str = field(default="main")
    use_auth_token: bool = field(default=False)
    groupbert_schedule: bool = field(default=False)


@dataclass
class DataTrainingArguments:
    dataset_path: Optional[str] = field(default=None)
    is_already_preprocessed: bool = field(default=False)
    is_already_masked: bool = field(default=False)
    max_seq_length: Optional[int] = field(default=None)
    mlm_probability: float = field(default=0.15)
    validation_split_percentage: int = field(default=5)


def groupbert_schedule(optimizer, num_warmup_steps, num_training_steps, lr_end=1e-7):
    """Square-root warmup, then linear decay to lr_end."""
    lr = optimizer.defaults["lr"]

    def multiplier(step):
        if step < num_warmup_steps:
            return (step / num_warmup_steps) ** 0.5
        if step >= num_training_steps:
            return lr_end / lr
        return 1 + (lr_end / lr - 1) * (step - num_warmup_steps) / (num_training_steps - num_warmup_steps)

    return LambdaLR(optimizer, multiplier)


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)

    set_seed(training_args.seed)

    raw = load_from_disk(data_args.dataset_path)
    split = raw.train_test_split(test_size=data_args.validation_split_percentage / 100, seed=training_args.seed)
    train_dataset, eval_dataset = split["train"], split["test"]

    config_kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "use_auth_token": True if model_args.use_auth_token else None,
    }
    if model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name, **config_kwargs)
    else:
        config = CONFIG_MAPPING[model_args.model_type]()
    if model_args.config_overrides is not None:
        config.update_from_string(model_args.config_overrides)

    if training_args.ipu_config_name:
        ipu_config = IPUConfig.from_pretrained(training_args.ipu_config_name, **config_kwargs)
    elif model_args.model_name_or_path:
        ipu_config = IPUConfig.from_pretrained(model_args.model_name_or_path, **config_kwargs)
    else:
        raise RuntimeError("You must provide an IPUConfig")

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name, **config_kwargs)

    max_seq_length = data_args.max_seq_length or len(train_dataset[0]["input_ids"])
    if data_args.is_already_masked:
        data_collator = default_data_collator
    else:
        data_collator = DataCollatorForLanguageModelingWithMaxTokensMasked(
            max_seq_length, tokenizer=tokenizer, mlm_probability=data_args.mlm_probability
        )
        # The pipelined models compute the MLM head at the masked positions only, up to this many per row.
        config.max_num_masked_tokens = data_collator.max_num_masked_tokens

    model = AutoModelForPreTraining.from_config(config)
    model.resize_token_embeddings(len(tokenizer))

    if training_args.do_train and training_args.pad_on_batch_axis:
        data_collator = pad_on_batch_axis(
            training_args.per_device_train_batch_size * ipu_config.batch_size_factor(),
            {k: -100 if k in ["labels", "next_sentence_label"] else 0 for k in train_dataset.column_names},
        )(data_collator)

    optimizers = (None, None)
    if model_args.groupbert_schedule:
        warmup = math.ceil(training_args.max_steps * training_args.warmup_ratio)
        schedule = functools.partial(
            groupbert_schedule, num_warmup_steps=warmup, num_training_steps=training_args.max_steps
        )
        optimizers = (None, schedule)

    trainer = IPUTrainer(
        model=model,
        ipu_config=ipu_config,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        tokenizer=tokenizer,
        data_collator=data_collator,
        optimizers=optimizers,
    )

    if training_args.do_train:
        train_result = trainer.train()
        trainer.save_model()
        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
