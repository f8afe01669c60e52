"""The parts of a run every example script shares: logging, the output folder, training, evaluation,
results files, and turning bad input into one clear error line."""

from __future__ import annotations

import atexit
import gc
import logging
import math
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Optional

import datasets
import torch
import transformers
from transformers import TrainerCallback
from transformers.modelcard import TrainingSummary

from ..config.ipu_config import IncompatibleIPUConfigError
from ..training.run_control import (
    CheckpointWriteError,
    RunFinished,
    RunLock,
    TrainingInterrupted,
    decided_by_process_zero,
    one_line,
)
from ..training.run_record import Decision, RunRecord, decide, set_aside_previous_run, weight_shaping_arguments
from .hub import HubError, check_push_to_hub

logger = logging.getLogger(__name__)

# Errors that mean "the input was wrong", reported as one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ValueError, FileNotFoundError, IncompatibleIPUConfigError, NotADirectoryError, IsADirectoryError, HubError,
)


LOG_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"


def setup_logging(training_args: Any) -> None:
    """One stream of log lines in one format: this package's, transformers' and datasets' loggers all write
    through the root handler (stdout), each line once. transformers and datasets otherwise each add a handler
    of their own, and datasets also propagates to the root, which printed its lines twice. The full argument
    dump is logged at debug level (`--log_level debug`); the start-up block states what the run uses."""
    logging.basicConfig(format=LOG_FORMAT, datefmt="%m/%d/%Y %H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    level = training_args.get_process_log_level()
    logging.getLogger("ipu_trainer").setLevel(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    datasets.utils.logging.set_verbosity(level)
    datasets_logger = logging.getLogger("datasets")
    for handler in list(datasets_logger.handlers):
        datasets_logger.removeHandler(handler)
    datasets.utils.logging.enable_propagation()
    logger.debug("Training/evaluation parameters %s", training_args)


_held_locks: list[RunLock] = []


def _release_locks() -> None:
    while _held_locks:
        _held_locks.pop().release()


atexit.register(_release_locks)


def end_distributed() -> None:
    """Tear down torch.distributed's process group, if any, and join its gloo threads before the interpreter exits.

    Why the join: a gloo worker thread finishes a collective, wakes the caller, and only then drops its reference
    to the collective's tensors. Those tensors have Python objects, which torch keeps alive while C++ holds the
    tensor, so dropping that reference takes the GIL on the worker thread. If the main thread holds the GIL on its
    way into interpreter shutdown meanwhile (the last collective is moments before the end of a run, and on a
    loaded machine a worker thread can sit preempted for a while), the worker gets the GIL only once shutdown has
    begun, and Python ends a thread that takes the GIL then. That thread is inside a noexcept destructor, so the
    C++ runtime aborts the process ("terminate called without an active exception", exit -6) after a run that
    finished and saved everything, and torchrun reports the job as failed.

    `destroy_process_group()` alone does not prevent it: it forgets the group, but gloo has no shutdown step, and
    the group's C++ object, with its threads, lives while anything holds it. DDP's reducer and ZeRO's optimizer
    hold it from inside the run's reference cycles, which otherwise only the garbage collector at shutdown frees.
    So the group is kept here while those cycles are collected, and the last reference is let go here: the
    group's Python object releases the GIL before destroying the C++ group, whose destructor joins the worker
    threads, so a thread still dropping tensors takes the GIL normally and has ended when this returns (the
    2-process tests check that no gloo thread is left).

    Local to the process: no collective, so a process that stops on an error does not wait for the others (the
    join waits only for collectives this process already started, as the destructor at shutdown did)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    group = torch.distributed.group.WORLD
    torch.distributed.destroy_process_group()
    gc.collect()  # the run's objects that hold the group (the trainer's DDP reducer, ZeRO) go, under the GIL
    del group  # the last reference: its release lets go of the GIL and joins the gloo threads


@dataclass
class ClaimedOutputDir:
    """What a training command does with its `--output_dir`, decided once by process 0 for every process."""

    checkpoint: Optional[str]  # resume from it; None: start afresh
    set_aside: bool  # the previous run is moved aside when training starts
    record: Optional[RunRecord]  # the run's `run.json`, written when training starts


def claim_output_dir(training_args: Any, *script_args: Any) -> ClaimedOutputDir:
    """Take `--output_dir` for this run before anything heavy happens, and decide what the command does with it.

    - One run per output folder: a lock held until the script ends (see `run_control.RunLock`).
    - The run's identity is its arguments that shape the weights (`training_args` and the script's other
      argument dataclasses, `script_args`); `run_record.decide` applies the rule: the same command resumes an
      interrupted run, with or without --overwrite_output_dir, and changes nothing in a finished one
      (`RunFinished`); --overwrite_output_dir sets a finished or different previous run aside (in
      `train_and_save`, once every input has been checked, so a refused command leaves the folder as it was).
    - `--resume_from_checkpoint` names the checkpoint itself (checked by the trainer).
    """
    if not training_args.do_train:
        return ClaimedOutputDir(None, False, None)
    output_dir = training_args.output_dir
    current = RunRecord(weight_shaping_arguments(training_args, *script_args), command=shlex.join(sys.argv))

    def take_lock_and_decide() -> Decision:
        lock = RunLock(output_dir)
        lock.acquire()
        _held_locks.append(lock)
        if training_args.resume_from_checkpoint is not None:
            previous = RunRecord.read(output_dir)
            same = previous is not None and previous.identity == current.identity
            return Decision(started=previous.started, started_at=previous.started_at) if same else Decision()
        return decide(output_dir, current, training_args.overwrite_output_dir,
                      needs_optimizer=not training_args.save_only_model)

    decision = decided_by_process_zero(take_lock_and_decide, training_args.process_index)
    if decision.finished is not None:
        raise RunFinished(decision.finished)
    if decision.started is not None:
        current.started, current.started_at = decision.started, decision.started_at
    if decision.checkpoint is not None:
        logger.info("Resuming from %s: the weights, optimizer, schedule and data position come from it.",
                    decision.checkpoint)
    return ClaimedOutputDir(decision.checkpoint, decision.set_aside, current)


def perplexity(loss: float) -> float:
    """exp(loss), inf when it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


class StreamResumeNote(TrainerCallback):
    """Says what resuming a --streaming run does with the stream. The upstream loop cannot seek in a stream: it reads
    it again from its start and drops the step batches already trained on (on the first process, which reads every
    process's batches), so training goes on with exactly the samples it would have had; reading them costs time."""

    def __init__(self, samples_per_step: int) -> None:
        self.samples_per_step = samples_per_step

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        steps = state.global_step
        if steps == 0:
            return
        if args.ignore_data_skip:
            logger.warning("Resuming a --streaming run at step %d with --ignore_data_skip: the stream starts again from "
                           "its first sample, so the samples of the first %d steps are trained on again.", steps, steps)
            return
        logger.info("Resuming a --streaming run at step %d: the stream is read again from its start and the %d step "
                    "batches already trained on (%d samples) are skipped, so training goes on where it stopped.",
                    steps, steps, steps * self.samples_per_step)


def train_and_save(trainer: Any, training_args: Any, claim: ClaimedOutputDir, num_train_samples: int) -> dict:
    """Train (resuming what `claim` says), then write the model, `train_results.json` and the trainer state."""
    output_dir = training_args.output_dir

    def start_the_run() -> None:
        # Only now, when every input was accepted: a refused command leaves the folder as it was.
        if claim.set_aside:
            aside = set_aside_previous_run(output_dir)
            if aside is not None:
                logger.warning("--overwrite_output_dir: moved the previous run's checkpoints and results to %s; this "
                               "run starts afresh.", aside)
        os.makedirs(output_dir, exist_ok=True)
        claim.record.write(output_dir)

    if claim.record is not None:
        decided_by_process_zero(start_the_run, training_args.process_index)
    checkpoint = training_args.resume_from_checkpoint or claim.checkpoint
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


def _data_description(data_args: Any) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """(dataset name for the card, hub dataset tag, its config) from the data arguments."""
    name = getattr(data_args, "dataset_name", None)
    if name is not None:
        config = getattr(data_args, "dataset_config_name", None)
        return (f"{name} {config}" if config else name), name, config
    local = getattr(data_args, "dataset_path", None) or getattr(data_args, "train_file", None)
    return (os.path.basename(os.path.normpath(local)) if local else None), None, None


def write_model_card(trainer: Any, model_args: Any, data_args: Any, tasks: str) -> None:
    """The model card of the output folder, saying what the model was trained from and on.

    Upstream's `create_model_card` names a model built from a config as fine-tuned from "" and local data as
    "the None dataset"; the summary it builds is corrected here before the card is written.
    """
    if not trainer.is_world_process_zero():
        return
    dataset, dataset_tag, dataset_config = _data_description(data_args)
    try:
        summary = TrainingSummary.from_trainer(
            trainer, finetuned_from=model_args.model_name_or_path or "", tasks=tasks,
            dataset_tags=dataset_tag or [], dataset=dataset, dataset_args=dataset_config or [],
        )
        summary.finetuned_from = model_args.model_name_or_path or None  # None: "trained from scratch"
        with open(os.path.join(trainer.args.output_dir, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(summary.to_model_card())
    except Exception as error:  # a model card is a courtesy: never fail a finished run over it
        logger.warning("Could not write the model card: %s", error)


def write_training_curves(trainer: Any) -> None:
    """`training_curves.png` in the output folder, drawn from the whole log history (the final evaluation
    included), on the first process only."""
    if not trainer.is_world_process_zero():
        return
    try:
        # Imported here: matplotlib loads only for a run that got this far, and a broken install costs the picture.
        from ..training.curves import write_training_curves as write_curves

        path = write_curves(trainer.state.log_history, trainer.args.output_dir)
    except Exception as error:  # a picture is a courtesy: never fail a finished run over it
        logger.warning("Could not draw the training curves: %s", error)
        return
    if path is None:
        logger.info("No training curves: the log history holds no loss, learning rate or throughput to draw.")
    else:
        logger.info("Training curves: %s", path)


def train_evaluate_and_report(
    trainer: Any, training_args: Any, model_args: Any, data_args: Any, claim: ClaimedOutputDir,
    train_dataset: Any, eval_dataset: Any, tasks: str,
) -> None:
    """The end of every script: --compile_only, or train, evaluate and write the results and model card; then
    the run's `run.json` says it finished, which makes the folder's top-level results this run's."""
    if training_args.compile_only:
        trainer.compile_only()
        return
    if training_args.do_train:
        if isinstance(train_dataset, datasets.IterableDataset):  # --streaming: a stream has no length
            samples_per_step = trainer.run.train_placement.samples_per_step
            trainer.add_callback(StreamResumeNote(samples_per_step))
            num_train_samples = samples_per_step * training_args.max_steps
        else:
            num_train_samples = len(train_dataset)
        train_and_save(trainer, training_args, claim, num_train_samples)
    if training_args.do_eval:
        evaluate_and_save(trainer, len(eval_dataset))
        if training_args.do_train:
            trainer.save_state()  # again: trainer_state.json's history then ends with the final evaluation too
    if training_args.do_train:
        write_model_card(trainer, model_args, data_args, tasks=tasks)
        write_training_curves(trainer)  # only a training run's folder is its own to draw in
        if trainer.is_world_process_zero() and claim.record is not None:
            claim.record.mark_finished(training_args.output_dir)


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


def resume_command() -> str:
    """The command that resumes this run: this process's own, or under torchrun (whose own arguments a process
    cannot see) the same torchrun command."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        return "the same torchrun command"
    return shlex.join(["python", *sys.argv])


def error_line(error: BaseException) -> str:
    """`error: <message>` on one line, whatever line breaks an upstream message carries."""
    return f"error: {one_line(error)}"


def run_cli(main: Callable[[], Any], user_errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
    """Run a script's `main()`; bad input (`user_errors`) ends with one `error:` line and exit code 2, not a
    traceback. A run that was already finished exits 0 with one line; one stopped by a signal exits 128 + the
    signal number with one line saying where to resume; a checkpoint that could not be written exits 1 with one
    `error:` line. Under torchrun each line is printed by the first process of each machine only."""
    try:
        main()
        return 0
    except RunFinished as finished:
        line, code = one_line(finished), 0
    except TrainingInterrupted as interrupted:
        line, code = f"{one_line(interrupted)}: {resume_command()}", interrupted.exit_code
    except CheckpointWriteError as error:
        line, code = error_line(error), 1
    except user_errors as error:
        line, code = error_line(error), 2
    except KeyboardInterrupt:
        line, code = f"interrupted: the newest complete checkpoint (if any) resumes with the same command: {resume_command()}", 130
    finally:
        _release_locks()
        end_distributed()
    if _reports_errors():
        print(line, file=sys.stderr)
    return code
