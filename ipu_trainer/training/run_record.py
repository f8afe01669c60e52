"""Which run an output folder holds, and what the same command does with it.

A training run writes `run.json` into its output folder when it starts: the arguments that shape the trained
weights, their hash (the run's identity), the command and when the run started. When the run has written its
results it adds when it finished and which top-level files it wrote. So the results at the top of a folder
belong to the run `run.json` names, and only when it says finished.

`decide` turns the folder's state and the new command into one of: resume a checkpoint, start afresh (setting
the previous run aside first, or not), or "this run already finished: nothing to do". The rule:

- The same arguments as an interrupted run resume its newest complete checkpoint, with or without
  `--overwrite_output_dir`: that flag discards a *different* or *finished* run, never the one being retried.
- The same arguments as a finished run: nothing to do; with `--overwrite_output_dir`, train it again afresh.
- Other arguments: `--overwrite_output_dir` sets the previous run aside and starts afresh; without it the
  newest checkpoint is resumed under the new arguments (as transformers does, with a warning naming what
  changed), except that a finished run is only continued for a longer schedule (`--max_steps`,
  `--num_train_epochs`), since its results would otherwise be claimed by arguments that did not make them.
- A folder without `run.json` (written before it existed, or by plain transformers): its newest checkpoint is
  resumed; `--overwrite_output_dir` sets it aside.
Setting aside moves, never deletes: the previous run's checkpoints, `run.json` and the files it recorded (or,
without a record, its results files) go to `overwritten-<time>/`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .checkpoints import CHECKPOINT_PATTERN, TRAINER_STATE_NAME, last_resumable_checkpoint, list_checkpoints

logger = logging.getLogger(__name__)

RECORD_NAME = "run.json"
SET_ASIDE_PREFIX = "overwritten-"
# The results a run without a record is known to have written at the top of its folder.
RESULT_FILES = ("train_results.json", "eval_results.json", "all_results.json", TRAINER_STATE_NAME)
# Arguments that change where and how often things are written, logged or evaluated, or how fast data is read,
# but not the trained weights: a run differing only in these is the same run.
NOT_SHAPING_WEIGHTS = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "run_name", "project", "report_to", "log_level",
    "log_level_replica", "log_on_each_node", "disable_tqdm", "push_to_hub", "do_eval", "do_predict",
    "per_device_eval_batch_size", "prediction_loss_only", "include_for_metrics", "batch_eval_metrics",
    "fp16_full_eval", "bf16_full_eval", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
    "local_rank", "ddp_timeout", "skip_memory_metrics", "torch_empty_cache_steps", "cache_dir", "token",
    "overwrite_cache", "preprocessing_num_workers", "max_eval_samples",
})
NOT_SHAPING_PREFIXES = ("logging_", "save_", "eval_", "hub_", "trackio_")
# A finished run is continued by a command that differs from it only in these: a longer schedule.
SCHEDULE_LENGTH = frozenset({"max_steps", "num_train_epochs"})


def _plain(value: Any) -> Any:
    """`value` as JSON would give it back, so that a recorded and a fresh value compare equal."""
    return json.loads(json.dumps(value, default=str))


def weight_shaping_arguments(*argument_sets: Any) -> dict[str, Any]:
    """The arguments of one run (a script's argument dataclasses) that shape the trained weights, by name."""
    arguments = {}
    for argument_set in argument_sets:
        values = (argument_set.to_dict() if hasattr(argument_set, "to_dict")
                  else {f.name: getattr(argument_set, f.name) for f in dataclasses.fields(argument_set)})
        for name, value in values.items():
            if name not in NOT_SHAPING_WEIGHTS and not name.startswith(NOT_SHAPING_PREFIXES):
                arguments[name] = _plain(value)
    return dict(sorted(arguments.items()))


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


@dataclass
class RunRecord:
    """The content of `run.json`."""

    arguments: dict[str, Any]
    command: str = ""
    started: str = field(default_factory=_now)
    started_at: float = field(default_factory=time.time)
    finished: Optional[str] = None
    files: list[str] = field(default_factory=list)

    @property
    def identity(self) -> str:
        text = json.dumps(self.arguments, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    @classmethod
    def read(cls, output_dir: str) -> Optional[RunRecord]:
        """The folder's record, or None when there is none (or it cannot be read: a run killed while writing it
        left the previous one, since it is replaced atomically)."""
        try:
            with open(os.path.join(output_dir, RECORD_NAME), encoding="utf-8") as handle:
                content = json.load(handle)
            content.pop("identity", None)
            return cls(**content)
        except (OSError, ValueError, TypeError):
            return None

    def write(self, output_dir: str) -> None:
        """Replace the folder's `run.json` atomically (a crash leaves the old one or the new one, whole)."""
        path = os.path.join(output_dir, RECORD_NAME)
        temporary = path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump({"identity": self.identity, **dataclasses.asdict(self)}, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)

    def differences(self, other: RunRecord) -> dict[str, tuple[Any, Any]]:
        """{name: (this record's value, the other's)} for every argument on which the two differ."""
        names = sorted(set(self.arguments) | set(other.arguments))
        return {name: (self.arguments.get(name), other.arguments.get(name)) for name in names
                if self.arguments.get(name) != other.arguments.get(name)}

    def mark_finished(self, output_dir: str) -> None:
        """Record that the run wrote its results, and which top-level files of the folder it wrote."""
        self.finished = _now()
        self.files = sorted(
            name for name in os.listdir(output_dir)
            if os.path.isfile(os.path.join(output_dir, name)) and name != RECORD_NAME and not name.endswith(".lock")
            and os.path.getmtime(os.path.join(output_dir, name)) >= self.started_at - 1
        )
        self.write(output_dir)


def describe_differences(differences: dict[str, tuple[Any, Any]], limit: int = 4) -> str:
    """'learning_rate 0.001 there, 0.0005 here; ...' for the first `limit` differences."""
    parts = [f"{name} {there!r} there, {here!r} here" for name, (there, here) in list(differences.items())[:limit]]
    more = len(differences) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


@dataclass
class Decision:
    """What a training command does with its output folder."""

    checkpoint: Optional[str] = None  # resume from it; None: start afresh
    set_aside: bool = False  # move the previous run aside before training
    finished: Optional[str] = None  # the message of "this run already finished: nothing to do"
    started: Optional[str] = None  # the previous record's start, kept when the same run is resumed
    started_at: Optional[float] = None


def _finished_message(output_dir: str, record: RunRecord) -> str:
    steps = ""
    try:
        with open(os.path.join(output_dir, TRAINER_STATE_NAME), encoding="utf-8") as handle:
            state = json.load(handle)
        steps = f", {state['global_step']} of {state['max_steps']} steps"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return (f"{output_dir} already holds this run, finished {record.finished}{steps}: nothing to do. Pass "
            "--overwrite_output_dir to train it again from scratch, or a larger --max_steps to train further.")


def decide(output_dir: str, current: RunRecord, overwrite: bool, needs_optimizer: bool = True) -> Decision:
    """What the command whose record is `current` does with `output_dir` (see the module's docstring)."""
    previous = RunRecord.read(output_dir)
    same = previous is not None and previous.identity == current.identity
    if same and previous.finished and not overwrite:
        return Decision(finished=_finished_message(output_dir, previous))
    checkpoint, skipped = last_resumable_checkpoint(output_dir, needs_optimizer=needs_optimizer)
    if skipped:
        logger.warning("Skipped checkpoint(s) that cannot be resumed from: %s", "; ".join(map(str, skipped)))
    if same and not previous.finished:
        if checkpoint is not None and overwrite:
            logger.info("%s holds this same run, interrupted: resuming it (--overwrite_output_dir only discards a "
                        "finished run or one with other arguments).", output_dir)
        # Whatever an earlier attempt of this run left without a checkpoint is its own, replaced as it goes.
        return Decision(checkpoint=checkpoint, started=previous.started, started_at=previous.started_at)
    if overwrite:
        return Decision(set_aside=True)
    if previous is not None and checkpoint is not None:
        differences = previous.differences(current)
        if previous.finished and not set(differences) <= SCHEDULE_LENGTH:
            raise ValueError(
                f"--output_dir {output_dir} holds a finished run made with other arguments "
                f"({describe_differences(differences)}): pass --overwrite_output_dir to train afresh with these "
                "(the finished run is moved aside, not deleted), or choose another --output_dir"
            )
        logger.warning("Resuming %s, saved by a run with other arguments (%s): it goes on with this command's.",
                       checkpoint, describe_differences(differences))
    others = [name for name in os.listdir(output_dir) if not name.endswith(".lock")
              and not CHECKPOINT_PATTERN.match(name)] if os.path.isdir(output_dir) else []
    if checkpoint is None and others:
        raise ValueError(
            f"--output_dir {output_dir} is not empty and holds no checkpoint to resume from: pass "
            "--overwrite_output_dir to train afresh there (what it holds is moved aside, not deleted), or choose "
            "another --output_dir"
        )
    return Decision(checkpoint=checkpoint)


def set_aside_previous_run(output_dir: str) -> Optional[str]:
    """Move the previous run of `output_dir` (its checkpoints, `run.json` and the top-level files it wrote) into
    `overwritten-<time>/`; nothing is deleted, and files the run did not write stay. Returns that folder, or None
    when there was nothing to move."""
    record = RunRecord.read(output_dir)
    top_level = list(record.files) if record is not None else list(RESULT_FILES)
    names = [os.path.basename(path) for path in list_checkpoints(output_dir)]
    names += [name for name in [*top_level, RECORD_NAME] if os.path.isfile(os.path.join(output_dir, name))]
    if not names:
        return None
    aside = os.path.join(output_dir, SET_ASIDE_PREFIX + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(aside, exist_ok=True)
    for name in dict.fromkeys(names):
        os.replace(os.path.join(output_dir, name), os.path.join(aside, name))
    return aside
