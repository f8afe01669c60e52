"""Where text and datasets come from, for training and for preparing data: local text files checked for text
and UTF-8, and datasets that may be streams (`--streaming`).

A stream has no length, so what needs one works from its first rows instead (`first_example`, `column_names_of`),
and a stream that evaluation needs in memory is read into a dataset (`materialise`).
"""

from __future__ import annotations

import codecs
import csv
import logging
from typing import Any, Callable, Optional

import datasets
from datasets import DatasetDict, IterableDatasetDict

logger = logging.getLogger(__name__)

# The local file extensions the scripts read, and the datasets builder of each.
FILE_BUILDERS = {"csv": "csv", "json": "json", "jsonl": "json", "txt": "text"}

# How much of a local file a streaming run checks before training (empty? UTF-8?): a stream is there so that a
# large corpus is not read before the first step.
STREAM_SCAN_BYTES = 64 << 20


# Rows per in-memory table when a stream is read into a Dataset (`materialise`).
MATERIALISE_ROWS = 1000


def scan_text_file(path: str, max_bytes: Optional[int] = None) -> tuple[bool, bool]:
    """`(has_text, is_valid_utf8)` of a file, read once in blocks (stops early once both are known), or of its
    first `max_bytes` bytes when given (it reads on until it finds text)."""
    has_text = False
    valid = True
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    read = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            read += len(block)
            try:
                text = decoder.decode(block)
            except UnicodeDecodeError:
                valid = False
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                text = decoder.decode(block)
            if not has_text and text.strip():
                has_text = True
            if has_text and (not valid or (max_bytes is not None and read >= max_bytes)):
                break
    return has_text, valid


def check_text_file(path: str, label: str, max_bytes: Optional[int] = None) -> bool:
    """Refuse a data file with nothing to train on; return whether its bytes are valid UTF-8.

    `label` names it in messages (e.g. "--train_file corpus.txt"). Empty and whitespace-only files, and csv
    files with a header but no rows, are refused. Bytes that are not UTF-8 are read as U+FFFD with a warning
    naming the file, in every script alike: a few stray bytes in a large scraped corpus should not stop a
    run, and the replacement character keeps the damage visible in the data. With `max_bytes` (streaming runs)
    only the file's beginning is checked for UTF-8.
    """
    has_text, valid = scan_text_file(path, max_bytes)
    if not has_text:
        raise ValueError(f"{label} is empty (or only blank lines): nothing to train on")
    if path.lower().endswith(".csv"):
        with open(path, newline="", encoding="utf-8", errors="replace") as handle:
            rows = csv.reader(handle)
            header = next(rows, None)
            if not any(any(cell.strip() for cell in row) for row in rows):
                raise ValueError(f"{label} has a header ({', '.join(header or [])}) but no rows: nothing to train on")
    if not valid:
        logger.warning(
            "%s is not valid UTF-8: undecodable bytes are replaced with U+FFFD. Re-encode the file as UTF-8 to keep "
            "those characters.", label,
        )
    return valid


def replacing_undecodable_bytes(builder: str) -> dict[str, str]:
    """`load_dataset` arguments that make the csv / json / text builder read bytes that are not UTF-8 as U+FFFD.
    The json builder applies `encoding_errors` only when re-encoding from another encoding, so it is given
    "utf-8-sig" (UTF-8 that also drops a leading byte-order mark) to take that path."""
    return {"encoding_errors": "replace", **({"encoding": "utf-8-sig"} if builder == "json" else {})}


def limit_samples(dataset: datasets.Dataset, max_samples: Optional[int]) -> datasets.Dataset:
    if max_samples is None:
        return dataset
    if is_stream(dataset):
        return dataset.take(max_samples)
    return dataset.select(range(min(max_samples, len(dataset))))


def is_stream(dataset: Any) -> bool:
    """Whether `dataset` (a split, or a dict of splits) is read as a stream (--streaming)."""
    if isinstance(dataset, (dict, DatasetDict, IterableDatasetDict)):
        return any(is_stream(split) for split in dataset.values())
    return isinstance(dataset, datasets.IterableDataset)


def first_example(dataset: Any) -> Optional[dict[str, Any]]:
    """The first row of a dataset or a stream (None when it has none). A stream is read up to its first row, through
    its preprocessing, so this also says whether preprocessing leaves it any row."""
    if not is_stream(dataset):
        return dataset[0] if len(dataset) else None
    return next(iter(dataset), None)


def column_names_of(dataset: Any) -> list[str]:
    """A dataset's columns; those of its first row for a stream whose columns are not known before it is read (csv,
    json and text files, and streams after a `map`)."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    example = first_example(dataset)
    return list(example) if example is not None else []


def map_data(
    data: Any, function: Callable, num_proc: Optional[int] = None, overwrite_cache: bool = False,
    desc: Optional[str] = None, **kwargs: Any,
) -> Any:
    """`data.map(function, **kwargs)` for a dataset or a stream (or a dict of either). A stream is mapped as it is
    read, so the options of a materialised dataset's map (processes, cache, progress bar) do not apply to it."""
    if is_stream(data):
        return data.map(function, **kwargs)
    return data.map(function, num_proc=num_proc, load_from_cache_file=not overwrite_cache, desc=desc, **kwargs)


def materialise(dataset: Any, max_samples: Optional[int] = None) -> datasets.Dataset:
    """A stream's first `max_samples` rows (all of them without a limit) read into an in-memory Dataset, so that
    evaluation and its metrics see a sized dataset; a Dataset is only cut to `max_samples`."""
    if not is_stream(dataset):
        return limit_samples(dataset, max_samples)
    stream = dataset.take(max_samples) if max_samples is not None else dataset
    tables = [datasets.Dataset.from_dict(batch, features=dataset.features)
              for batch in stream.iter(batch_size=MATERIALISE_ROWS)]
    if not tables:
        return datasets.Dataset.from_dict({name: [] for name in column_names_of(dataset)}, features=dataset.features)
    return datasets.concatenate_datasets(tables)
