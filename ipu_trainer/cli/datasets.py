"""The example scripts' datasets: loading, splits, length rules and the checks of what was loaded.

Data comes from the hub (`--dataset_name`), a `save_to_disk` folder (`--dataset_path`) or local
csv/json/txt files; a validation split is carved out of train when the data has none.

With `--streaming` every split is a `datasets.IterableDataset`, read and preprocessed as the run iterates it: the
functions here take either kind (`ipu_trainer.data.sources` says how), and the training stream is read in order,
again from its start whenever it ends (`train_and_eval_splits`).
"""

from __future__ import annotations

import logging
import os
from itertools import chain
from typing import Any, Callable, Optional

import datasets
from datasets import DatasetDict, IterableDatasetDict, load_dataset, load_from_disk
from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError

from ..data.sources import (
    FILE_BUILDERS,
    STREAM_SCAN_BYTES,
    check_text_file,
    column_names_of,
    first_example,
    is_stream,
    limit_samples,
    map_data,
    materialise,
    replacing_undecodable_bytes,
)
from . import hub

logger = logging.getLogger(__name__)

MAX_DEFAULT_SEQ_LENGTH = 1024


def data_files_of(data_args: Any) -> dict[str, str]:
    """The `--train_file`/`--validation_file` pair, checked: present on disk and of a supported type."""
    files = {}
    for split, path in (("train", getattr(data_args, "train_file", None)), ("validation", getattr(data_args, "validation_file", None))):
        if path is None:
            continue
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--{split}_file {path}: no such file")
        extension = path.rsplit(".", 1)[-1].lower()
        if extension not in FILE_BUILDERS:
            raise ValueError(f"--{split}_file {path}: unsupported file type '.{extension}'; use a csv, json or txt file")
        files[split] = path
    extensions = {FILE_BUILDERS[p.rsplit(".", 1)[-1].lower()] for p in files.values()}
    if len(extensions) > 1:
        raise ValueError(f"--train_file and --validation_file must be of the same type, got {sorted(extensions)}")
    return files


def data_source_of(data_args: Any) -> str:
    """The flag and value the run's data comes from, for messages."""
    for name in ("dataset_name", "dataset_path", "train_file", "validation_file"):
        value = getattr(data_args, name, None)
        if value:
            return f"--{name} {value}"
    return "the data"


def load_hub_dataset(
    flag: str, name: str, config_name: Optional[str] = None, **kwargs: Any
) -> DatasetDict | IterableDatasetDict:
    """`datasets.load_dataset(name, config_name, **kwargs)` for a dataset given as `flag`: a local folder, or a hub
    dataset, with one-line errors. Offline (HF_HUB_OFFLINE=1) datasets uses its cache without asking the hub.
    When the hub cannot be reached and offline mode is not set, datasets would retry for half a minute before
    looking at its cache, so the run stops at once and says to set HF_HUB_OFFLINE=1 for a cached copy."""
    local = os.path.exists(os.path.expanduser(name))
    if not local:
        if not hub.could_be_hub_id(name):
            raise FileNotFoundError(f"{flag} {name}: no such folder, and not a hub dataset id (e.g. wikitext)")
        if not hub.is_offline() and hub.unreachable_reason() is not None:
            raise hub.HubError(hub.not_reachable_line(flag, name, "dataset folder", repo_type="dataset"))
    try:
        return load_dataset(name, config_name, **kwargs)
    except (ConnectionError, DatasetNotFoundError, DataFilesNotFoundError) as error:
        if hub.is_offline() and not local:
            raise hub.HubError(hub.not_reachable_line(flag, name, "dataset folder", repo_type="dataset")) from None
        raise hub.HubError(f"{flag} {name}: {hub.one_line(error)}") from None
    except ValueError as error:  # e.g. a dataset with several configurations and none chosen (--dataset_config_name)
        raise ValueError(f"{flag} {name}: {hub.one_line(error)}") from None


def load_raw_datasets(
    data_args: Any,
    model_args: Any,
    text_builder_kwargs: Optional[dict] = None,
    file_loader: Optional[Callable[..., DatasetDict]] = None,
) -> DatasetDict:
    """Load the run's data as a DatasetDict with a "train" and, when possible, a "validation" split.

    `file_loader(data_files, cache_dir=...)` replaces the datasets csv/json/text builders for local files
    (pretraining reads them as documents); `text_builder_kwargs` go to the text builder (e.g. keep_linebreaks).

    With `--streaming` it is an IterableDatasetDict of streams (and `file_loader` is given `streaming=True`): hub
    datasets and local files are read as they are iterated, a `--dataset_path` folder row by row. No validation
    split is carved out of a stream (its size is unknown): see `train_and_eval_splits`.
    """
    cache_dir = getattr(model_args, "cache_dir", None)
    token = hub.hub_token(model_args)
    dataset_path = getattr(data_args, "dataset_path", None)
    streaming = bool(getattr(data_args, "streaming", False))
    if streaming and getattr(data_args, "preprocessing_num_workers", None):
        logger.info("--streaming: --preprocessing_num_workers is not used; the stream is preprocessed as it is read")
    if data_args.dataset_name is not None:
        raw = load_hub_dataset(
            "--dataset_name", data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir, token=token,
            data_dir=getattr(data_args, "data_dir", None), **({"streaming": True} if streaming else {}),
        )
    elif dataset_path is not None:
        if not os.path.isdir(dataset_path):
            raise FileNotFoundError(f"--dataset_path {dataset_path}: no such folder (expected a Dataset.save_to_disk folder)")
        loaded = load_from_disk(dataset_path)
        raw = loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
        if streaming:
            raw = IterableDatasetDict({name: split.to_iterable_dataset() for name, split in raw.items()})
    else:
        files = data_files_of(data_args)
        if not files:
            raise ValueError(
                "No data given: pass --dataset_name, --dataset_path, or --train_file/--validation_file (csv, json or txt)."
            )
        builder = FILE_BUILDERS[next(iter(files.values())).rsplit(".", 1)[-1].lower()]
        kwargs = dict(text_builder_kwargs or {}) if builder == "text" else {}
        if file_loader is not None:  # it checks its files itself
            raw = file_loader(files, cache_dir=cache_dir, **({"streaming": True} if streaming else {}))
        else:
            max_bytes = STREAM_SCAN_BYTES if streaming else None
            all_utf8 = all([check_text_file(path, f"--{split}_file {path}", max_bytes) for split, path in files.items()])
            if not all_utf8 or streaming:  # a stream is checked only at its start: replace wherever they are
                kwargs.update(replacing_undecodable_bytes(builder))
            raw = load_dataset(builder, data_files=files, cache_dir=cache_dir, streaming=streaming, **kwargs)
            for split, path in files.items():
                text_column_of(raw[split], f"--{split}_file {path}")
    if "validation" not in raw and "train" in raw and not streaming:
        raw = _split_validation(raw, data_args.validation_split_percentage)
    return raw


def _split_validation(raw: DatasetDict, percentage: Optional[int]) -> DatasetDict:
    if not percentage:
        return raw
    if not 0 < percentage < 100:
        raise ValueError(f"--validation_split_percentage={percentage} is invalid: must be between 1 and 99")
    train = raw["train"]
    # The first rows, as the original and the transformers examples' split="train[:N%]" / "train[N%:]" (rounded to
    # the closest row, as datasets rounds percent slices), so the same command reports the same eval numbers.
    n_validation = max(1, int(round(percentage * len(train) / 100.0)))
    if n_validation >= len(train):
        logger.warning("Only %d training rows: no validation split carved out.", len(train))
        return raw
    raw["validation"] = train.select(range(n_validation))
    raw["train"] = train.select(range(n_validation, len(train)))
    return raw


# ---- streams -------------------------------------------------------------------------------------------------


def eval_held_out_of_train(data_args: Any, training_args: Any, has_validation: bool) -> bool:
    """The streaming hold-out rule of every script: whether evaluation takes the first --max_eval_samples samples of
    the training data (and training skips them). So it does with --streaming --do_eval and no validation data
    (`has_validation`: a validation split, or --validation_file), and it is refused without --max_eval_samples,
    since a percentage of a stream of unknown size cannot be taken.

    Each caller asks as soon as it knows whether there is validation data: the flags for local files, before
    anything is loaded (`script_args.check_streaming_args`); the loaded splits otherwise (`train_and_eval_splits`,
    and run_pretraining, which holds out whole blocks of documents when it builds the pairs itself).
    """
    if not (getattr(data_args, "streaming", False) and training_args.do_eval) or has_validation:
        return False
    if data_args.max_eval_samples is None:
        raise ValueError(
            "--streaming with --do_eval and no validation data (no validation split, no --validation_file) needs "
            "--max_eval_samples N: the first N samples are held out for evaluation (a --validation_split_percentage "
            "of a stream of unknown size cannot be taken)"
        )
    return True


def pad_lines_to_max_length(data_args: Any, world_size: int) -> bool:
    """Whether --line_by_line samples are padded to max_seq_length when tokenized: with --pad_to_max_length, and for
    a stream read by several processes. The first process reads the batches of every process for a step and hands
    each its slice of their concatenation, which needs one shape for all of them."""
    if data_args.pad_to_max_length or not data_args.line_by_line:
        return data_args.pad_to_max_length
    if getattr(data_args, "streaming", False) and world_size > 1:
        logger.info("--streaming --line_by_line with %d processes: samples are padded to max_seq_length, so that every "
                    "process's batch has one shape", world_size)
        return True
    return False


def resolve_sequence_length(
    flag: str, requested: Optional[int], tokenizer: Any, model_max_positions: Optional[int] = None
) -> int:
    """`--max_seq_length` (run_mlm, run_pretraining) or `--block_size` (run_clm), one rule for both.

    Not given: the tokenizer maximum capped at 1024 and at the model's positions. Given: longer than the model's
    positions is an error (the first step would fail inside the embeddings); longer than the tokenizer maximum is
    clipped to it with a warning, as the Hugging Face examples do.
    """
    if requested is not None and requested < 1:
        raise ValueError(f"{flag}={requested} is invalid: must be >= 1")
    if requested is not None and model_max_positions is not None and requested > model_max_positions:
        raise ValueError(
            f"{flag} {requested} is larger than the model's {model_max_positions} positions "
            f"(n_positions / max_position_embeddings): use {flag} <= {model_max_positions} or a model with more "
            f"positions (e.g. --config_overrides max_position_embeddings={requested} for a new BERT, "
            f"n_positions={requested} for a new GPT-2)"
        )
    tokenizer_max = tokenizer.model_max_length
    if requested is None:
        length = min(tokenizer_max, MAX_DEFAULT_SEQ_LENGTH)
        if model_max_positions is not None:
            length = min(length, model_max_positions)
        if tokenizer_max > MAX_DEFAULT_SEQ_LENGTH:
            logger.warning("The tokenizer's maximum length (%s) is large; using %s %d. Set %s to change it.",
                           tokenizer_max, flag, length, flag)
        return length
    if requested > tokenizer_max:
        logger.warning("%s %d is longer than the tokenizer maximum (%d); using %d.", flag, requested, tokenizer_max,
                       tokenizer_max)
    return min(requested, tokenizer_max)


def text_column_of(dataset: datasets.Dataset | datasets.IterableDataset, source: str = "the dataset") -> str:
    """The column holding the text: "text", else the first column (as the original scripts); refused when it
    does not hold strings, since tokenizing it would fail with a message naming neither the data nor the flag.
    A stream whose column types are not known before it is read is judged by its first row."""
    names = column_names_of(dataset)
    if not names:
        raise ValueError(f"{source} has no rows: nothing to train on")
    column = "text" if "text" in names else names[0]
    if dataset.features is not None and column in dataset.features:
        feature = dataset.features[column]
        is_text = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
        kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
    else:
        value = first_example(dataset)[column]
        is_text, kind = value is None or isinstance(value, str), type(value).__name__
    if not is_text:
        raise ValueError(
            f"{source} has no 'text' column, and its first column {column!r} holds {kind}, not text (columns: "
            f"{', '.join(names)}): put the text in a column named 'text'"
        )
    return column


def group_texts(examples: dict[str, list], block_size: int) -> dict[str, list]:
    """Concatenate every column and cut it into `block_size` pieces, dropping the remainder."""
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated[next(iter(examples))])
    total_length = (total_length // block_size) * block_size
    return {
        k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()
    }


def text_and_other_columns(raw: Any) -> tuple[str, list[str]]:
    """The text column of the run's data (of "train" when there is one) and every column the tokenization replaces."""
    column = text_column_of(raw["train"] if "train" in raw else next(iter(raw.values())))
    return column, column_names_of(next(iter(raw.values())))


def text_blocks(
    raw: Any, tokenizer: Any, block_size: int, num_proc: Optional[int] = None, overwrite_cache: bool = False,
    with_labels: bool = False, **tokenizer_kwargs: Any,
) -> Any:
    """All texts tokenized (with `tokenizer_kwargs`), concatenated and cut into `block_size` blocks, the remainder
    dropped, as the Hugging Face examples do; `with_labels` adds labels = input_ids (a causal LM shifts them)."""
    column, remove = text_and_other_columns(raw)

    def tokenize_all(examples):
        return tokenizer(examples[column], **tokenizer_kwargs)

    tokenized = map_data(
        raw, tokenize_all, num_proc, overwrite_cache, "Tokenizing texts", batched=True, remove_columns=remove,
    )
    return map_data(
        tokenized, _blocks_with_labels if with_labels else group_texts, num_proc, overwrite_cache,
        f"Grouping texts in blocks of {block_size}", batched=True, fn_kwargs={"block_size": block_size},
    )


def _blocks_with_labels(examples: dict[str, list], block_size: int) -> dict[str, list]:
    blocks = group_texts(examples, block_size)
    blocks["labels"] = [list(ids) for ids in blocks["input_ids"]]
    return blocks


def require_columns(dataset: datasets.Dataset, columns: list[str], hint: str, source: str = "the dataset") -> None:
    present = column_names_of(dataset)
    missing = [c for c in columns if c not in present]
    if missing:
        raise ValueError(
            f"{source} has no {', '.join(repr(c) for c in missing)} column{'s' if len(missing) > 1 else ''} "
            f"(it has {present}). {hint}"
        )


def require_samples(dataset: datasets.Dataset, split: str, what: str, source: str = "") -> None:
    """A split that preprocessing left empty is a user error, not a crash deep in the trainer. A stream is read up to
    its first sample to know."""
    if first_example(dataset) is None:
        raise ValueError(f"the {split} data{f' ({source})' if source else ''} yields no samples: {what}")


def split_source(data_args: Any, split: str) -> str:
    """The flag and value a split's data comes from ("--validation_file X", else the whole data's), for messages."""
    own_file = getattr(data_args, f"{split}_file", None)
    if own_file:
        return f"--{split}_file {own_file}"
    return data_source_of(data_args)


def require_full_step(num_samples: int, placement: Any, max_train_samples: Optional[int] = None) -> None:
    """Refuse training data smaller than one step's batch (`placement` is the run's train placement): every step
    would be a whole epoch on fewer samples than the IPU config asks for, and samples/s would be fictitious."""
    if num_samples >= placement.samples_per_step:
        return
    cut = f" (cut to --max_train_samples {max_train_samples})" if max_train_samples is not None else ""
    raise ValueError(
        f"the training data has {num_samples} samples{cut} but one step takes {placement.samples_per_step} (micro "
        f"{placement.micro_batch_size} x accumulation {placement.gradient_accumulation_steps} x replicas "
        f"{placement.replication_factor} x device iterations {placement.device_iterations}): give more data, or lower "
        "--per_device_train_batch_size, --gradient_accumulation_steps, --n_ipu or device_iterations "
        "(--ipu_config_overrides)"
    )


def train_and_eval_splits(
    datasets_by_split: Any, training_args: Any, data_args: Any, empty_hint: str, run: Any = None
) -> tuple[Optional[datasets.Dataset | datasets.IterableDataset], Optional[datasets.Dataset]]:
    """The train split for --do_train and the validation split for --do_eval, cut to --max_*_samples. Given the
    `run` (a ResolvedRun), training data smaller than one step's batch is refused (`require_full_step`).

    Streams (--streaming): the training stream is cut with `take`, checked to yield a sample, and repeated, so that
    --max_steps steps always find full step batches and a resumed run can skip the batches already trained on
    whatever the number of passes; its size stays unknown, so the one-step check is left out. The evaluation set is
    read into memory (`materialise`): the validation split, or without one the first --max_eval_samples training
    samples, which training then skips (`eval_held_out_of_train`).
    """
    train_dataset = eval_dataset = None
    train_source = datasets_by_split.get("train")
    held_out = None
    if eval_held_out_of_train(data_args, training_args, "validation" in datasets_by_split) and train_source is not None:
        held_out = materialise(train_source, data_args.max_eval_samples)
        train_source = train_source.skip(data_args.max_eval_samples)
        logger.info("--streaming: the first %d samples of the training data are held out for evaluation (and not "
                    "trained on)", len(held_out))
    if training_args.do_train:
        if train_source is None:
            raise ValueError("--do_train requires a train split (--train_file, --dataset_name or --dataset_path)")
        train_dataset = limit_samples(train_source, data_args.max_train_samples)
        require_samples(train_dataset, "train", empty_hint, split_source(data_args, "train"))
        if is_stream(train_dataset):
            train_dataset = train_dataset.repeat(None)
            logger.info("--streaming: the training data is read in order, and again from its start whenever it ends "
                        "before --max_steps")
        elif run is not None:
            require_full_step(len(train_dataset), run.train_placement, data_args.max_train_samples)
    if training_args.do_eval:
        if held_out is None and "validation" not in datasets_by_split:
            raise ValueError("--do_eval requires a validation split (--validation_file or --validation_split_percentage)")
        eval_dataset = held_out if held_out is not None else materialise(
            datasets_by_split["validation"], data_args.max_eval_samples
        )
        require_samples(eval_dataset, "validation", empty_hint, split_source(data_args, "validation"))
    return train_dataset, eval_dataset
