"""The parts of a run every example script shares: logging, the output folder, training, evaluation,
results files, and turning bad input into one clear error line."""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
from typing import Any, Callable, Optional

import datasets
import transformers
from transformers.trainer_utils import get_last_checkpoint

from .hub import HubError, check_push_to_hub, one_line
from .ipu_config import IncompatibleIPUConfigError

logger = logging.getLogger(__name__)

# Errors that mean "the input was wrong", reported as one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ValueError, FileNotFoundError, IncompatibleIPUConfigError, NotADirectoryError, IsADirectoryError, HubError,
)


def setup_logging(training_args: Any) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    level = training_args.get_process_log_level()
    logging.getLogger("ipu_trainer").setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.info("Training/evaluation parameters %s", training_args)


def find_checkpoint_to_resume(training_args: Any) -> Optional[str]:
    """SPEC §8: a non-empty output_dir without a checkpoint is refused unless --overwrite_output_dir;
    one with a checkpoint resumes from it unless --resume_from_checkpoint names another."""
    output_dir = training_args.output_dir
    if not (os.path.isdir(output_dir) and training_args.do_train and not training_args.overwrite_output_dir):
        return None
    last_checkpoint = get_last_checkpoint(output_dir)
    if last_checkpoint is None and len(os.listdir(output_dir)) > 0:
        raise ValueError(
            f"Output directory ({output_dir}) already exists and is not empty. "
            "Use --overwrite_output_dir to overwrite it, or choose another --output_dir."
        )
    if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
        logger.info(
            "Checkpoint detected, resuming training at %s. To avoid this behavior, change the --output_dir or add "
            "--overwrite_output_dir to train from scratch.", last_checkpoint,
        )
    return last_checkpoint


def perplexity(loss: float) -> float:
    """exp(loss), inf when it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def train_and_save(trainer: Any, training_args: Any, last_checkpoint: Optional[str], num_train_samples: int) -> dict:
    checkpoint = training_args.resume_from_checkpoint or last_checkpoint
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()  # the model, the tokenizer and ipu_config.json
    metrics = dict(train_result.metrics)
    metrics["train_samples"] = num_train_samples
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    return metrics


def evaluate_and_save(trainer: Any, num_eval_samples: int) -> dict:
    logger.info("*** Evaluate ***")
    metrics = trainer.evaluate()
    metrics["eval_samples"] = num_eval_samples
    metrics["perplexity"] = perplexity(metrics["eval_loss"])
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return metrics


def write_model_card(trainer: Any, model_args: Any, data_args: Any, tasks: str) -> None:
    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": tasks}
    if getattr(data_args, "dataset_name", None) is not None:
        kwargs["dataset_tags"] = data_args.dataset_name
        if data_args.dataset_config_name is not None:
            kwargs["dataset_args"] = data_args.dataset_config_name
            kwargs["dataset"] = f"{data_args.dataset_name} {data_args.dataset_config_name}"
        else:
            kwargs["dataset"] = data_args.dataset_name
    try:
        trainer.create_model_card(**kwargs)
    except Exception as error:  # a model card is a courtesy: never fail a finished run over it
        logger.warning("Could not write the model card: %s", error)


def train_evaluate_and_report(
    trainer: Any, training_args: Any, model_args: Any, data_args: Any, last_checkpoint: Optional[str],
    train_dataset: Any, eval_dataset: Any, tasks: str,
) -> None:
    """The end of every script: --compile_only, or train, evaluate and write the results and model card."""
    if training_args.compile_only:
        trainer.compile_only()
        return
    if training_args.do_train:
        train_and_save(trainer, training_args, last_checkpoint, len(train_dataset))
    if training_args.do_eval:
        evaluate_and_save(trainer, len(eval_dataset))
    if training_args.do_train:
        write_model_card(trainer, model_args, data_args, tasks=tasks)


def check_output_dir_writable(output_dir: str) -> None:
    """Refuse, before anything is loaded, an --output_dir the results could not be written to: a file, a path
    under a file, or a folder this process cannot create files in. Nothing is created; the probe file written
    into the nearest existing folder is removed at once."""
    existing = os.path.abspath(os.path.expanduser(output_dir))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == os.path.abspath(os.path.expanduser(output_dir)) else f"is under the file {existing}"
        raise NotADirectoryError(f"--output_dir {output_dir} {where}: choose a folder (new or existing)")
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
    except OSError as error:
        raise ValueError(
            f"--output_dir {output_dir}: cannot write in {existing} ({error.strerror or error}): choose a folder you "
            "can write to"
        ) from None
    os.close(handle)
    os.remove(probe)


def check_outputs_before_loading(training_args: Any) -> None:
    """Where the results go, checked before any data or weights are loaded: --output_dir is writable, and
    --push_to_hub can reach the hub with a login."""
    check_output_dir_writable(training_args.output_dir)
    check_push_to_hub(training_args)


def _reports_errors() -> bool:
    """Under torchrun every process meets the same bad input: only the first process of each machine
    (LOCAL_RANK 0) prints it, so a machine's log has the line once. The environment is read, not
    torch.distributed, because most input is refused before the process group exists."""
    rank = os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")).strip()
    return rank in ("", "0")


def error_line(error: BaseException) -> str:
    """`error: <message>` on one line, whatever line breaks an upstream message carries."""
    return f"error: {one_line(error)}"


def run_cli(main: Callable[[], Any], user_errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
    """Run a script's `main()`; bad input (`user_errors`) ends with one `error:` line and exit code 2, not a
    traceback."""
    try:
        main()
    except user_errors as error:
        if _reports_errors():
            print(error_line(error), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
