"""Checkpoints a run can always resume from, whatever moment it was stopped at.

transformers writes a checkpoint file by file into `checkpoint-N/`. A run killed in the middle (kill -9,
pre-emption, a full disk) leaves a folder that looks like a checkpoint but is not one. So:

- When every process has finished writing `checkpoint-N`, process 0 flushes each file to disk and then
  writes `checkpoint_complete.json` (the size of every file, and a CRC-32 of the weights), itself written
  to a temporary name, flushed and renamed: the folder is complete exactly when the marker exists.
- Resuming takes the newest checkpoint that is complete *and* loadable: the marker's files are all there
  with their sizes, the weights match their CRC-32, every torch file passes its zip archive's own CRC check
  and `trainer_state.json` parses. Older checkpoints without a marker (written before this existed, or by
  plain transformers) are accepted when all of that holds for the files a resume needs.
- Old checkpoints are rotated (`--save_total_limit`) only after the new one is complete, and the newest
  complete checkpoint is never removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger(__name__)

COMPLETION_MARKER = "checkpoint_complete.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
# Under --fsdp accelerate writes the (full) optimizer state as optimizer.bin and the weights a second time, for its
# own resume, as pytorch_model_fsdp.bin (model.safetensors is written too, gathered for from_pretrained).
FSDP_OPTIMIZER_NAME = "optimizer.bin"
FSDP_WEIGHTS_NAME = "pytorch_model_fsdp.bin"
SCHEDULER_NAME = "scheduler.pt"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                FSDP_WEIGHTS_NAME)
_CHUNK = 1 << 22


def checkpoint_step(path: str) -> Optional[int]:
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint-N` folders of `output_dir`, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    folders = [os.path.join(output_dir, name) for name in os.listdir(output_dir)
               if CHECKPOINT_PATTERN.match(name) and os.path.isdir(os.path.join(output_dir, name))]
    return sorted(folders, key=checkpoint_step, reverse=True)


def _crc32(path: str) -> int:
    value = 0
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            value = zlib.crc32(block, value)
    return value


def _files_of(folder: str) -> list[str]:
    """Every file under `folder`, as paths relative to it, the marker and its temporary file left out."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), folder)
            if not relative.startswith(COMPLETION_MARKER):
                found.append(relative)
    return sorted(found)


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def mark_complete(checkpoint_dir: str) -> None:
    """Flush the checkpoint's files to disk and write its completion marker atomically (process 0 only, after
    every process has written its part)."""
    files = {}
    for relative in _files_of(checkpoint_dir):
        path = os.path.join(checkpoint_dir, relative)
        _fsync(path)
        entry = {"bytes": os.path.getsize(path)}
        if relative.endswith(".safetensors"):
            entry["crc32"] = _crc32(path)  # safetensors carry no checksum of their own
        files[relative] = entry
    temporary = os.path.join(checkpoint_dir, COMPLETION_MARKER + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({"files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, os.path.join(checkpoint_dir, COMPLETION_MARKER))
    _fsync(checkpoint_dir)


def _unloadable(path: str, relative: str) -> Optional[str]:
    """Why a file a resume reads cannot be read, or None."""
    if relative.endswith((".pt", ".pth", ".bin")):
        try:
            with zipfile.ZipFile(path) as archive:
                broken = archive.testzip()
        except (zipfile.BadZipFile, OSError) as error:
            return f"{relative} is not a readable torch file ({error})"
        if broken is not None:
            return f"{relative} is corrupt (bad CRC in {broken})"
    elif relative.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
        except (ValueError, OSError) as error:
            return f"{relative} is not readable JSON ({error})"
    return None


def checkpoint_problem(checkpoint_dir: str, needs_optimizer: bool = True) -> Optional[str]:
    """Why `checkpoint_dir` cannot be resumed from, or None when it can (see the module docstring)."""
    marker_path = os.path.join(checkpoint_dir, COMPLETION_MARKER)
    if os.path.isfile(marker_path):
        try:
            with open(marker_path, encoding="utf-8") as handle:
                files = json.load(handle)["files"]
        except (ValueError, KeyError, OSError) as error:
            return f"its completion marker is unreadable ({error})"
    else:
        files = {relative: None for relative in _files_of(checkpoint_dir)}
    required = [TRAINER_STATE_NAME] + ([OPTIMIZER_NAME, SCHEDULER_NAME] if needs_optimizer else [])
    if FSDP_WEIGHTS_NAME in files or FSDP_OPTIMIZER_NAME in files:  # an --fsdp checkpoint: accelerate's two files
        required.append(FSDP_WEIGHTS_NAME)
        if OPTIMIZER_NAME in required:
            required[required.index(OPTIMIZER_NAME)] = FSDP_OPTIMIZER_NAME
    for name in required:
        if name not in files:
            return f"it has no {name}" + ("" if os.path.isfile(marker_path) else " (interrupted while saving?)")
    if not any(name in files for name in WEIGHT_FILES):
        return "it has no model weights (interrupted while saving?)"
    for relative, entry in files.items():
        path = os.path.join(checkpoint_dir, relative)
        if not os.path.isfile(path):
            return f"{relative} is missing"
        if entry is not None and os.path.getsize(path) != entry["bytes"]:
            return f"{relative} has {os.path.getsize(path)} bytes, {entry['bytes']} were written"
        if entry is not None and "crc32" in entry and _crc32(path) != entry["crc32"]:
            return f"{relative} is corrupt (its CRC-32 differs from the one written)"
        problem = _unloadable(path, relative)
        if problem:
            return problem
    return None


@dataclass(frozen=True)
class SkippedCheckpoint:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{os.path.basename(self.path)} ({self.reason})"


def last_resumable_checkpoint(output_dir: str, needs_optimizer: bool = True) -> tuple[Optional[str], list[SkippedCheckpoint]]:
    """The newest checkpoint of `output_dir` a run can resume from, and the newer ones skipped with why."""
    skipped = []
    for path in list_checkpoints(output_dir):
        problem = checkpoint_problem(path, needs_optimizer)
        if problem is None:
            return path, skipped
        skipped.append(SkippedCheckpoint(path, problem))
    return None, skipped


def rotate_checkpoints(output_dir: str, save_total_limit: Optional[int], keep: tuple[str, ...] = ()) -> list[str]:
    """With `save_total_limit` set, delete the oldest complete checkpoints beyond it and the incomplete ones older
    than the newest complete checkpoint (leftovers of interrupted saves). The newest complete checkpoint and
    `keep` (e.g. the best model's) always stay. Returns the deleted folders."""
    if not save_total_limit or save_total_limit <= 0:
        return []
    checkpoints = list_checkpoints(output_dir)
    complete = [path for path in checkpoints if os.path.isfile(os.path.join(path, COMPLETION_MARKER))]
    if not complete:
        return []
    newest_step = checkpoint_step(complete[0])
    kept = {os.path.normpath(path) for path in (*keep, complete[0]) if path}
    doomed = complete[save_total_limit:]
    doomed += [path for path in checkpoints if path not in complete and checkpoint_step(path) < newest_step]
    deleted = []
    for path in doomed:
        if os.path.normpath(path) in kept:
            continue
        logger.info("Deleting %s (--save_total_limit %d)", path, save_total_limit)
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, relative)) for relative in _files_of(path))
