#!/usr/bin/env python
"""Turn text (or BERT tfrecord shards) into a BERT pretraining dataset saved with `save_to_disk`: sentence
pairs with next-sentence labels and a seeded masking, in the format of Graphcore/wikipedia-bert-128, ready for
`run_pretraining.py --dataset_path OUT --is_already_preprocessed`. For example (the second command converts
tfrecord shards):

    python prepare_dataset.py --tokenizer_name bert-base-uncased --train_file corpus.txt \\
        --max_seq_length 128 --output_dir data/pretrain-128 --num_workers 8
    python prepare_dataset.py --tokenizer_name bert-base-uncased --tfrecord_files shards/*.tfrecord \\
        --output_dir data/from-tfrecord

The output is a DatasetDict with a "train" split (and "validation" with --validation_file or
--validation_split_percentage): `input_ids`, `attention_mask`, `token_type_ids`, `labels`,
`next_sentence_label`, and `length` (each pair's real tokens, which --packing plans its rows from), written in
files of at most --max_shard_size.

Memory does not grow with the corpus: documents are read, paired, masked and written in blocks (the pairs of a
block take their random next sentences from the block's own documents: see ipu_trainer/data/nsp_pairs.py), and
the summary is read back in blocks too.

Masking. `labels` always comes from a seeded static masking (-100 where a token is not masked). By
default `input_ids` are stored UNMASKED: the trainer's default dynamic masking re-masks every batch from
`input_ids` and ignores the stored labels, which needs the originals. With --static_masking the masked
ids are stored instead, for training with --is_already_masked (the stored masking is then used as is).
"""

# ---- arguments, logging ---------------------------------------------------------------------------
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import struct
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import datasets
import numpy as np
import pyarrow.compute
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher
from datasets.utils.py_utils import convert_file_size_to_int

from ipu_trainer.cli.datasets import load_hub_dataset
from ipu_trainer.cli.model_loading import load_tokenizer
from ipu_trainer.cli.script_args import CommandLineParser, help_header
from ipu_trainer.cli.startup import USER_ERRORS, check_output_dir_writable, run_cli
from ipu_trainer.training.run_control import LOCK_NAME, RunLock
from ipu_trainer.data.nsp_pairs import (
    MASKED_PAIR_FEATURES,
    add_mlm_labels,
    build_nsp_pairs,
    dataset_fingerprint,
    load_text_documents,
)
from ipu_trainer.data.packing import LENGTH_COLUMN
from ipu_trainer.models.layers import IGNORE_INDEX

logger = logging.getLogger("prepare_dataset")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandLineParser(description=help_header(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("input (one of)")
    source.add_argument("--train_file", nargs="+", help="txt (blank-line separated documents), csv or json files")
    source.add_argument("--dataset_name", help="a dataset on the hub (or a local loading script/folder)")
    source.add_argument("--tfrecord_files", nargs="+", help="BERT/Graphcore-format tfrecord shards to convert")
    parser.add_argument(
        "--validation_file", nargs="+",
        help="with --train_file: documents for the validation split (txt, csv or json), in one pass",
    )
    parser.add_argument("--dataset_config_name", help="the dataset's configuration name")
    parser.add_argument("--text_column", default="text", help="column of --dataset_name holding the documents")
    parser.add_argument("--tokenizer_name", help="tokenizer folder or hub id (required for text input)")
    parser.add_argument("--max_seq_length", type=int, help="sequence length (128 and 512 for the two BERT phases)")
    parser.add_argument("--output_dir", required=True, help="where the save_to_disk dataset is written")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output_dir")
    parser.add_argument("--num_workers", type=int, default=None, help="processes for building and masking")
    parser.add_argument(
        "--max_shard_size", default="500MB",
        help="largest data file of a split (e.g. 500MB, 2GB): a large result is written as many files",
    )
    parser.add_argument("--num_shards", type=int, help="data files per split, instead of --max_shard_size")
    parser.add_argument("--seed", type=int, default=42, help="seed for pairs, masking and the validation split")
    parser.add_argument("--mlm_probability", type=float, default=0.15)
    parser.add_argument("--short_seq_prob", type=float, default=0.1)
    parser.add_argument(
        "--dupe_factor", type=int, default=1,
        help="passes over the training documents, each with its own pairs and masking (validation: one pass)",
    )
    parser.add_argument(
        "--validation_split_percentage", type=float, default=0,
        help="percentage of documents (of pairs for tfrecord input) held out as a validation split",
    )
    parser.add_argument(
        "--static_masking", action="store_true",
        help="store masked input_ids (for --is_already_masked); by default input_ids stay unmasked",
    )
    parser.add_argument(
        "--cache_dir",
        help="datasets cache folder, kept after the run for the next one (and where hub files are downloaded). "
        "Default: the run's cache is a folder inside OUTPUT.partial, removed when the output is written, and a hub "
        "dataset is downloaded to the global datasets cache",
    )
    args = parser.parse_args(argv)

    # Checks of the values together: one `error:` line each (through run_cli), not argparse's usage block.
    sources = [name for name in ("train_file", "dataset_name", "tfrecord_files") if getattr(args, name)]
    if len(sources) != 1:
        raise ValueError("give exactly one of --train_file, --dataset_name or --tfrecord_files")
    if not args.tfrecord_files and (args.max_seq_length is None or args.tokenizer_name is None):
        raise ValueError("--tokenizer_name and --max_seq_length are required to build sentence pairs from text")
    if not 0 <= args.validation_split_percentage < 100:
        raise ValueError(f"--validation_split_percentage={args.validation_split_percentage} must be in [0, 100)")
    if args.dupe_factor < 1:
        raise ValueError(f"--dupe_factor={args.dupe_factor} must be >= 1")
    if args.validation_file and not args.train_file:
        raise ValueError("--validation_file goes with --train_file (text documents)")
    if args.validation_file and args.validation_split_percentage > 0:
        raise ValueError("give --validation_file or --validation_split_percentage, not both")
    if args.num_shards is not None and args.num_shards < 1:
        raise ValueError(f"--num_shards={args.num_shards} must be >= 1")
    try:
        shard_bytes = convert_file_size_to_int(args.max_shard_size)
    except ValueError:
        shard_bytes = 0
    if shard_bytes < 1:
        raise ValueError(f"--max_shard_size={args.max_shard_size!r} is not a size: give one like 500MB or 2GB")
    return args


# ---- output folder: only what this tool wrote is ever deleted ---------------------------------------
# A finished output is recognised by its SUMMARY_FILE, a folder being written (OUTPUT.partial) by
# PARTIAL_MARKER, written into it before anything else.
SUMMARY_FILE = "prepare_dataset.json"
PARTIAL_MARKER = ".prepare_dataset_partial"


def previous_output_entries(folder: str) -> set[str] | None:
    """The entries a previous prepare_dataset.py output consists of (its summary, dataset_dict.json and one
    folder per split), or None when `folder` is not such an output."""
    summary = os.path.join(folder, SUMMARY_FILE)
    if not os.path.isfile(summary):
        return None
    entries = {SUMMARY_FILE, "dataset_dict.json"}
    try:
        with open(os.path.join(folder, "dataset_dict.json")) as handle:
            entries.update(json.load(handle).get("splits", []))
    except (OSError, ValueError):
        pass
    return entries


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse, before any work, an output folder the result could not replace without deleting someone's files."""
    check_output_dir_writable(output_dir)
    if not (os.path.isdir(output_dir) and os.listdir(output_dir)):
        return
    if not overwrite:
        raise ValueError(f"--output_dir {output_dir} exists and is not empty: pass --overwrite to replace it")
    entries = previous_output_entries(output_dir)
    if entries is None:
        raise ValueError(
            f"--overwrite: --output_dir {output_dir} is not a prepare_dataset.py output (it has no {SUMMARY_FILE}), "
            "so nothing in it is replaced: choose another --output_dir, or empty it yourself"
        )
    others = sorted(set(os.listdir(output_dir)) - entries)
    if others:
        raise ValueError(
            f"--overwrite: --output_dir {output_dir} holds files prepare_dataset.py did not write "
            f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}): move them away, or choose another --output_dir"
        )


def check_partial_dir(partial_dir: str) -> None:
    """An existing OUTPUT.partial folder may be removed only when an interrupted prepare_dataset.py left it."""
    if not os.path.exists(partial_dir):
        return
    if not os.path.isdir(partial_dir) or not (
        os.path.isfile(os.path.join(partial_dir, PARTIAL_MARKER)) or previous_output_entries(partial_dir) is not None
    ):
        raise ValueError(
            f"{partial_dir} exists and was not left by prepare_dataset.py (no {PARTIAL_MARKER} in it), and the output "
            "is written there first: move it away or choose another --output_dir"
        )


# The run's datasets cache (documents, pairs, masks), inside its work folder: removed once the output is written,
# so nothing of the run stays in the user's global datasets cache (about twice the output's size otherwise).
WORK_CACHE = "datasets_cache"


def claim_partial_dir(partial_dir: str) -> RunLock:
    """Make `partial_dir` (checked by `check_partial_dir`) this run's work folder: created and marked, or taken over
    from an interrupted run, whose datasets cache is kept for this run to reuse and whose other entries are removed.
    Its lock (held until the run ends) refuses a second run on the same output."""
    os.makedirs(partial_dir, exist_ok=True)
    marker = os.path.join(partial_dir, PARTIAL_MARKER)
    if not os.path.isfile(marker):
        with open(marker, "w") as handle:
            handle.write("written by prepare_dataset.py; the folder is removed by the next run if this one was interrupted\n")
    lock = RunLock(partial_dir)
    lock.acquire()
    left = [entry for entry in os.listdir(partial_dir) if entry not in (PARTIAL_MARKER, LOCK_NAME, WORK_CACHE)]
    if left:
        logger.info("Removing what an interrupted run left in %s", partial_dir)
    for entry in left:
        path = os.path.join(partial_dir, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    if os.path.isdir(os.path.join(partial_dir, WORK_CACHE)):
        logger.info("Reusing the datasets cache an interrupted run left in %s", os.path.join(partial_dir, WORK_CACHE))
    return lock


def replace_output(partial_dir: str, output_dir: str) -> None:
    """Move the finished `partial_dir` to `output_dir`, removing only a previous output's own entries."""
    os.remove(os.path.join(partial_dir, PARTIAL_MARKER))
    if os.path.isdir(output_dir):
        for entry in previous_output_entries(output_dir) or ():
            path = os.path.join(output_dir, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
        os.rmdir(output_dir)  # empty by now, or check_output_dir would have refused it
    os.replace(partial_dir, output_dir)


# ---- tfrecord input -------------------------------------------------------------------------------


TFRECORD_FEATURES = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids",
                     "next_sentence_labels")


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # CRC-32C (Castagnoli), reflected
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def _masked_crc(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C rotated right by 15 bits plus a constant. Only ever computed on the 8-byte
    length fields here, so a table in Python is fast enough."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC32C_TABLE[(crc ^ byte) & 0xFF]
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def check_tfrecord_shard(path: str) -> None:
    """Refuse a file that is not a BERT pretraining TFRecord shard, before any conversion starts.

    Every record header is walked (its length and the length's checksum, without reading the data), so a
    truncated or foreign file is found here rather than as a traceback deep inside the reader; the first
    record is parsed to check it carries the BERT features.
    """
    from tfrecord.reader import tfrecord_loader

    label = f"--tfrecord_files {path}"
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        offset = 0
        while offset < size:
            header = handle.read(12)
            if len(header) < 12:
                raise ValueError(f"{label} is not a TFRecord file (or is truncated): incomplete record header at byte {offset}")
            (length,) = struct.unpack("<Q", header[:8])
            (length_crc,) = struct.unpack("<I", header[8:])
            if length_crc != _masked_crc(header[:8]) or offset + 16 + length > size:
                raise ValueError(f"{label} is not a TFRecord file (or is truncated): bad record header at byte {offset}")
            offset += 16 + length
            handle.seek(offset)
    try:
        first = next(iter(tfrecord_loader(path, None)))
    except Exception as error:  # the protobuf decoder's errors: the shard holds something else
        raise ValueError(f"{label}: the first record is not a tf.train.Example ({error})") from None
    missing = [name for name in TFRECORD_FEATURES if name not in first]
    if missing:
        raise ValueError(
            f"{label} is not a BERT pretraining shard: its records lack {', '.join(missing)} (they have "
            f"{', '.join(sorted(first))})"
        )


def _tfrecord_examples(paths: list[str], static_masking: bool) -> Iterator[dict[str, Any]]:
    from tfrecord.reader import tfrecord_loader

    for path in paths:
        records = iter(tfrecord_loader(path, None))
        index = 0
        while True:
            try:
                record = next(records, None)
                if record is None:
                    break
                example = tfrecord_to_spec(record, static_masking)
            except Exception as error:  # the protobuf decoder's or a missing feature's: the shard is damaged
                raise ValueError(f"--tfrecord_files {path}: record {index} is not a BERT pretraining example ({error})") from None
            yield example
            index += 1


def tfrecord_to_spec(record: dict[str, np.ndarray], static_masking: bool = False) -> dict[str, Any]:
    """One BERT tfrecord example (input_ids, input_mask, segment_ids, masked_lm_*) in the columns of the
    original's pre-built datasets.

    The shards store input_ids already masked, with the originals in masked_lm_ids at masked_lm_positions
    (padded with position 0, which is always [CLS], and weight 0). Labels are the originals at the real
    positions and -100 elsewhere; unless `static_masking`, the originals are also put back into input_ids
    so the trainer's dynamic masking starts from unmasked text.
    """
    input_ids = np.asarray(record["input_ids"], dtype=np.int64).copy()
    positions = np.asarray(record["masked_lm_positions"], dtype=np.int64)
    originals = np.asarray(record["masked_lm_ids"], dtype=np.int64)
    if "masked_lm_weights" in record:
        real = np.asarray(record["masked_lm_weights"]) > 0
    else:
        real = positions > 0
    positions, originals = positions[real], originals[real]
    labels = np.full_like(input_ids, IGNORE_INDEX)
    labels[positions] = originals
    if not static_masking:
        input_ids[positions] = originals
    attention_mask = np.asarray(record["input_mask"], dtype=np.int64)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": np.asarray(record["segment_ids"], dtype=np.int64),
        "labels": labels,
        "next_sentence_label": int(np.asarray(record["next_sentence_labels"]).reshape(-1)[0]),
        LENGTH_COLUMN: int(attention_mask.sum()),
    }


def load_tfrecords(paths: list[str], static_masking: bool, cache_dir: str | None) -> datasets.Dataset:
    try:
        import tfrecord  # noqa: F401  (checked here so the error says what to install)
    except ImportError as error:
        raise ImportError("--tfrecord_files needs the tfrecord reader. To fix: pip install tfrecord") from error
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist")
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path} is empty: nothing to pretrain on")
        check_tfrecord_shard(path)
    stamps = [(os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in paths]
    try:
        return datasets.Dataset.from_generator(
            _tfrecord_examples_with_stamps,
            gen_kwargs={"paths": [os.path.abspath(path) for path in paths], "stamps": stamps,
                        "static_masking": static_masking},
            features=MASKED_PAIR_FEATURES,
            cache_dir=cache_dir,
        )
    except DatasetGenerationError as error:
        # datasets wraps whatever the generator raised; a bad record is the user's shard, not a crash.
        if isinstance(error.__cause__, ValueError):
            raise error.__cause__ from None
        raise


def _tfrecord_examples_with_stamps(paths: list[str], stamps: list, static_masking: bool) -> Iterator[dict]:
    # `stamps` only feeds datasets' cache key, so a rewritten shard is not served from the cache.
    del stamps
    yield from _tfrecord_examples(paths, static_masking)


# ---- summary --------------------------------------------------------------------------------------


# Rows read at a time by `summarize`: a block of 128-token rows is a few MB, so the summary of a corpus of any size
# costs the same memory (it read whole columns at once, about 2 bytes of memory per byte of output).
SUMMARY_ROWS = 1 << 15


def summarize(dataset: datasets.Dataset) -> dict[str, float]:
    """The split's numbers for the log and prepare_dataset.json, read `SUMMARY_ROWS` rows at a time."""
    arrow = dataset.with_format("arrow")
    random_next = tokens = positions = num_masked = 0
    for start in range(0, len(dataset), SUMMARY_ROWS):
        table = arrow[start : start + SUMMARY_ROWS]
        attention = pyarrow.compute.list_flatten(table.column("attention_mask"))
        labels = pyarrow.compute.list_flatten(table.column("labels"))
        random_next += pyarrow.compute.sum(table.column("next_sentence_label")).as_py() or 0
        tokens += pyarrow.compute.sum(attention).as_py() or 0
        positions += len(attention)
        num_masked += pyarrow.compute.sum(pyarrow.compute.not_equal(labels, IGNORE_INDEX)).as_py() or 0
    return {
        "pairs": len(dataset),
        "random_next_fraction": random_next / max(1, len(dataset)),
        "padding_fraction": 1.0 - tokens / max(1, positions),
        "masked_tokens_per_sequence": num_masked / max(1, len(dataset)),
    }


# ---- main -----------------------------------------------------------------------------------------


def build_dataset(args: argparse.Namespace, partial_dir: str, cache_dir: str | None) -> dict[str, Any]:
    """Build the splits and write them and their summary into `partial_dir`, with the datasets cache in `cache_dir`.
    Returns the summary.

    A hub dataset itself is read from (and downloaded to) the datasets cache of --cache_dir, the global one by
    default, where it is kept for the next run and for offline use (HF_HUB_OFFLINE=1); what is built from it goes in
    `cache_dir`."""
    # ---- data -------------------------------------------------------------------------------------
    summary: dict[str, Any] = {"arguments": vars(args)}
    if args.tfrecord_files:
        tokenizer = None
        examples = load_tfrecords(args.tfrecord_files, args.static_masking, cache_dir)
        if len(examples) == 0:
            raise ValueError(f"{args.tfrecord_files[0]} holds no examples: nothing to pretrain on")
        length = len(examples[0]["input_ids"])
        if args.max_seq_length is not None and args.max_seq_length != length:
            raise ValueError(f"--max_seq_length={args.max_seq_length} but the tfrecord sequences have length {length}")
        splits = {"train": examples}
        if args.validation_split_percentage > 0:
            held_out = examples.train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
            splits = {"train": held_out["train"], "validation": held_out["test"]}
    else:
        # ---- tokenizer ------------------------------------------------------------------------
        tokenizer = load_tokenizer(
            SimpleNamespace(tokenizer_name=args.tokenizer_name, model_name_or_path=None, cache_dir=args.cache_dir)
        )
        if args.max_seq_length > tokenizer.model_max_length:
            raise ValueError(
                f"--max_seq_length={args.max_seq_length} is longer than the tokenizer's model_max_length="
                f"{tokenizer.model_max_length}"
            )
        validation_documents = None
        if args.train_file:
            files = {"train": args.train_file, **({"validation": args.validation_file} if args.validation_file else {})}
            loaded = load_text_documents(files, cache_dir=cache_dir)
            documents, validation_documents = loaded["train"], loaded.get("validation")
            text_column = "text"
        else:
            local = os.path.exists(os.path.expanduser(args.dataset_name))  # a folder or loading script, not a hub id
            loaded = load_hub_dataset("--dataset_name", args.dataset_name, args.dataset_config_name,
                                      cache_dir=cache_dir if local else args.cache_dir)
            documents = loaded["train"]
            text_column = args.text_column
            if text_column not in documents.column_names:
                raise ValueError(
                    f"--text_column={text_column!r} is not a column of {args.dataset_name}: {documents.column_names}"
                )
        source = f"--train_file {' '.join(args.train_file)}" if args.train_file else f"--dataset_name {args.dataset_name}"
        document_splits = {"train": documents}
        if args.validation_split_percentage > 0:
            # Split documents, not pairs, so no validation pair shares a document with training. The split's
            # indices go in `cache_dir` (datasets would write them next to the documents, in the global cache for a
            # hub dataset), named after what decides them.
            test_size = args.validation_split_percentage / 100
            key = Hasher.hash([dataset_fingerprint(documents), test_size, args.seed])
            os.makedirs(cache_dir, exist_ok=True)
            held_out = documents.train_test_split(
                test_size=test_size, seed=args.seed,
                train_indices_cache_file_name=os.path.join(cache_dir, f"split-{key}-train.arrow"),
                test_indices_cache_file_name=os.path.join(cache_dir, f"split-{key}-test.arrow"),
            )
            document_splits = {"train": held_out["train"], "validation": held_out["test"]}
        if validation_documents is not None:
            document_splits["validation"] = validation_documents
        summary["documents"] = {name: len(split) for name, split in document_splits.items()}

        # ---- sentence pairs and masking ---------------------------------------------------------
        splits = {}
        for name, split_documents in document_splits.items():
            pairs = build_nsp_pairs(
                split_documents, tokenizer, args.max_seq_length, text_column=text_column,
                short_seq_prob=args.short_seq_prob, seed=args.seed, num_proc=args.num_workers,
                dupe_factor=args.dupe_factor if name == "train" else 1, source=f"the {name} part of {source}",
                cache_dir=cache_dir,
            )
            splits[name] = add_mlm_labels(
                pairs, tokenizer, mlm_probability=args.mlm_probability, seed=args.seed,
                mask_input_ids=args.static_masking, num_proc=args.num_workers,
            )

    # ---- write: into the work folder, renamed to the output by `main` once complete ------------------------
    # Sharded: files of at most --max_shard_size (or --num_shards of them per split), each memory-mapped on its own
    # when the dataset is loaded.
    dataset = datasets.DatasetDict(splits)
    shards = ({"num_shards": {name: min(args.num_shards, len(split)) for name, split in splits.items()}}
              if args.num_shards else {"max_shard_size": args.max_shard_size})
    dataset.save_to_disk(partial_dir, num_proc=args.num_workers if args.num_workers and args.num_workers > 1 else None,
                         **shards)
    summary["splits"] = {name: summarize(split) for name, split in dataset.items()}
    with open(os.path.join(partial_dir, SUMMARY_FILE), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    datasets.utils.logging.set_verbosity_warning()

    output_dir = os.path.abspath(args.output_dir.rstrip("/\\"))
    partial_dir = output_dir + ".partial"
    check_output_dir(output_dir, args.overwrite)
    check_partial_dir(partial_dir)

    # ---- the work folder: OUTPUT.partial, with the run's datasets cache unless --cache_dir names one ----------
    lock = claim_partial_dir(partial_dir)
    work_cache = os.path.join(partial_dir, WORK_CACHE) if args.cache_dir is None else None
    try:
        summary = build_dataset(args, partial_dir, cache_dir=args.cache_dir or work_cache)
        if work_cache is not None and os.path.isdir(work_cache):
            shutil.rmtree(work_cache)  # everything the output needs from it has been written by now
        check_output_dir(output_dir, args.overwrite)  # again, just before anything in it is replaced
    except Exception:
        lock.release()
        shutil.rmtree(partial_dir, ignore_errors=True)  # this run's work folder: a failed run leaves nothing behind
        raise
    finally:
        lock.release()
    replace_output(partial_dir, output_dir)

    # ---- results ------------------------------------------------------------------------------------
    for name, numbers in summary["splits"].items():
        documents_note = f"{summary['documents'][name]} documents -> " if "documents" in summary else ""
        logger.info(
            "%s: %s%d pairs, %.1f%% random next sentence, %.1f%% padding, %.1f masked tokens per sequence",
            name, documents_note, numbers["pairs"], 100 * numbers["random_next_fraction"],
            100 * numbers["padding_fraction"], numbers["masked_tokens_per_sequence"],
        )
    logger.info("Saved to %s (train with --dataset_path %s --is_already_preprocessed)", output_dir, output_dir)
    return summary


def cli() -> int:
    """The command line: bad input, or the tfrecord reader missing, is one `error:` line and exit code 2."""
    return run_cli(main, (*USER_ERRORS, ImportError))


if __name__ == "__main__":
    sys.exit(cli())
