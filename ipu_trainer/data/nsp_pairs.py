"""BERT pretraining data from raw text: documents -> sentences -> NSP sentence pairs in the
columns of the original's pre-built datasets (input_ids, attention_mask, token_type_ids, labels,
next_sentence_label).

This follows the published BERT `create_pretraining_data.py` recipe, but works on token ids and in
blocks so it is fast and parallel:

1. Documents: txt files hold documents separated by blank lines (BERT's format); csv/json files and
   hub datasets hold one document per row.
2. Sentences: `split_sentences` cuts a document at newlines and at `.`, `!` or `?` (optionally followed
   by a closing quote or bracket) followed by whitespace and an upper-case letter, digit or opening
   quote. It is a fast heuristic: "e.g. Python" is split too. BERT's own format (one sentence per line)
   goes through unchanged. The boundaries only decide where segment A may end, so an occasional wrong
   cut costs little.
3. All sentences of a block of documents are tokenized in one call to the fast tokenizer.
4. Pairs are built per document exactly as in the original (see `_pairs_from_document`).

Determinism: documents are processed in `len(documents) // DOCUMENTS_PER_BLOCK` blocks of consecutive
documents (near-equal sizes, each at least `DOCUMENTS_PER_BLOCK` when there are that many documents),
each with its own random generator seeded from `seed` and the block's index. The random "other
document" for a label-1 pair is drawn from the same block, so blocks are independent and the result
depends only on the seed and the data, not on `num_proc`. A stream of documents (--streaming) is cut into
blocks of exactly `DOCUMENTS_PER_BLOCK` documents as it is read, with the same recipe and seeds (`stream_nsp_pairs`).

Storage: token-id sequences are int32 (half the disk of int64 for corpora of tens of millions of
pairs), `next_sentence_label` is int64. Collators turn both into int64 tensors.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import datasets
import multiprocess
import numpy as np
import pyarrow.compute
import torch
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

from .collators import DataCollatorForLanguageModelingWithMaxTokensMasked
from .packing import LENGTH_COLUMN
from .sources import (
    FILE_BUILDERS,
    STREAM_SCAN_BYTES,
    check_text_file,
    column_names_of,
    first_example,
    replacing_undecodable_bytes,
)

logger = logging.getLogger(__name__)

# A block is the unit of parallel work and the pool for random next sentences. 256 documents keep the
# random B segments varied and make one tokenizer call large enough to amortise its overhead.
DOCUMENTS_PER_BLOCK = 256
PAIRS_PER_MASKING_BLOCK = 1024
# Bump when the pair recipe changes so cached results from an older recipe are not reused.
_RECIPE_VERSION = "nsp-pairs-v1"


PAIR_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "attention_mask": datasets.Sequence(datasets.Value("int32")),
        "token_type_ids": datasets.Sequence(datasets.Value("int32")),
        "next_sentence_label": datasets.Value("int64"),
    }
)

# Pairs with MLM labels: the format of Graphcore/wikipedia-bert-128 (what prepare_dataset.py writes), plus each
# pair's number of real tokens (the sum of its attention_mask), so that --packing plans its rows from one small
# column instead of reading every row's attention_mask before the first step.
MASKED_PAIR_FEATURES = datasets.Features(
    {
        "input_ids": PAIR_FEATURES["input_ids"],
        "attention_mask": PAIR_FEATURES["attention_mask"],
        "token_type_ids": PAIR_FEATURES["token_type_ids"],
        "labels": datasets.Sequence(datasets.Value("int32")),
        "next_sentence_label": PAIR_FEATURES["next_sentence_label"],
        LENGTH_COLUMN: datasets.Value("int32"),
    }
)

# The leading `(?=\s)` lets the engine reject the ~85% of positions that are not whitespace at once
# (twice as fast as the bare alternatives).
_SENTENCE_BOUNDARY = re.compile(
    r"(?=\s)(?:\s*\n\s*"
    r"|(?<=[.!?])\s+(?=[\"'“‘(\[]?[A-Z0-9])"
    r"|(?<=[.!?][\"'”’)\]])\s+(?=[\"'“‘(\[]?[A-Z0-9]))"
)


# ---------------------------------------------------------------------------------------------------
# Private upstream touchpoints
# ---------------------------------------------------------------------------------------------------
# datasets has no public accessor for a dataset's fingerprint (the key its own cache uses), and the pair
# builder's cache must follow it so that edited data is never served from an old cache file.
# tests/test_nsp_pairs.py fails by name if it disappears.


def dataset_fingerprint(dataset: datasets.Dataset) -> str:
    return dataset._fingerprint


# ---------------------------------------------------------------------------------------------------
# Loading documents
# ---------------------------------------------------------------------------------------------------


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lstrip(".").lower()


def _check_files(files: Sequence[str], max_bytes: int | None = None) -> list[str]:
    """Validate paths; return the files that are not valid UTF-8 (after warning about each), judged from their first
    `max_bytes` bytes when given (see `data.check_text_file`)."""
    non_utf8 = []
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist")
        extension = _extension(path)
        if extension not in FILE_BUILDERS:
            raise ValueError(
                f"{path} has an unsupported extension {extension!r}: use one of {', '.join(FILE_BUILDERS)}"
            )
        if not check_text_file(path, path, max_bytes=max_bytes):
            non_utf8.append(path)
    return non_utf8


def _blank_line_documents(paths: list[str], stamps: list[tuple[int, int]]) -> Iterator[dict[str, str]]:
    # `stamps` (size, mtime) is unused here: it is part of gen_kwargs so datasets' cache key changes
    # when a file is edited in place.
    del stamps
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines: list[str] = []
            for line in handle:
                if line.strip():
                    lines.append(line.rstrip("\r\n"))
                elif lines:
                    yield {"text": "\n".join(lines)}
                    lines = []
            if lines:
                yield {"text": "\n".join(lines)}


def load_text_documents(
    data_files: dict[str, list[str] | str], cache_dir: str | None = None, streaming: bool = False
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """Load pretraining documents, one split per key of `data_files`, into a single "text" column; with `streaming`,
    as streams read from the files as they are iterated (the same documents, in the same order).

    - txt: documents are blocks of lines separated by blank lines (BERT's format); line breaks inside a
      document are kept (they are sentence boundaries for `split_sentences`).
    - csv / json / jsonl: one document per row, from the column "text" (other columns are dropped).
    All files of one split must share an extension. Missing files raise FileNotFoundError, unsupported
    extensions and empty (or whitespace-only) files raise ValueError naming the file. Bytes that are not
    UTF-8 are decoded as U+FFFD with a warning naming the file, in the main process, before any worker
    starts (for streams: a warning when the first `data.STREAM_SCAN_BYTES` hold any, U+FFFD wherever they are).
    """
    splits = {}
    for split, files in data_files.items():
        files = [files] if isinstance(files, str) else list(files)
        if not files:
            raise ValueError(f"No files given for the {split!r} split")
        non_utf8 = _check_files(files, max_bytes=STREAM_SCAN_BYTES if streaming else None)
        extensions = {_extension(path) for path in files}
        if len(extensions) > 1:
            raise ValueError(f"The {split!r} split mixes file types {sorted(extensions)}: use one type per split")
        extension = extensions.pop()
        if extension == "txt":
            stamps = [(os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in files]
            generator_options = dict(
                gen_kwargs={"paths": [os.path.abspath(path) for path in files], "stamps": stamps},
                features=datasets.Features({"text": datasets.Value("string")}),
                split=datasets.NamedSplit(split),
            )
            if streaming:
                documents = datasets.IterableDataset.from_generator(_blank_line_documents, **generator_options)
            else:
                documents = datasets.Dataset.from_generator(_blank_line_documents, cache_dir=cache_dir, **generator_options)
        else:
            builder = "json" if extension in ("json", "jsonl") else "csv"
            documents = datasets.load_dataset(
                builder,
                data_files={split: files},
                cache_dir=cache_dir,
                streaming=streaming,
                **(replacing_undecodable_bytes(builder) if non_utf8 or streaming else {}),
            )[split]
            columns = column_names_of(documents)
            if "text" not in columns:
                raise ValueError(
                    f"{files[0]} has no 'text' column (columns: {columns}): put one document "
                    "per row in a column named 'text'"
                )
            documents = documents.select_columns(["text"])
        splits[split] = documents
    return datasets.IterableDatasetDict(splits) if streaming else datasets.DatasetDict(splits)


# ---------------------------------------------------------------------------------------------------
# Sentence pairs
# ---------------------------------------------------------------------------------------------------


def split_sentences(text: str) -> list[str]:
    """Split a document into sentences (see the module docstring for the rule); drops empty pieces."""
    return [sentence for sentence in _SENTENCE_BOUNDARY.split(text.strip()) if sentence]


def _block_seed(*parts: Any) -> int:
    # A hash, not a sum, so (seed, block) pairs never collide across seeds; stable across processes.
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _truncated_lengths(length_a: int, length_b: int, max_num_tokens: int) -> tuple[int, int]:
    """Final lengths after BERT's `truncate_seq_pair`, computed in O(1).

    The original removes one token at a time from the longer segment (B on ties) until the pair fits.
    So the longer one shrinks to the shorter one's length first, then the two alternate, B first.
    """
    excess = length_a + length_b - max_num_tokens
    if excess <= 0:
        return length_a, length_b
    if length_a > length_b:
        gap = length_a - length_b
        if excess <= gap:
            return length_a - excess, length_b
        rest = excess - gap
        return length_b - rest // 2, length_b - (rest + 1) // 2
    gap = length_b - length_a
    if excess <= gap:
        return length_a, length_b - excess
    rest = excess - gap
    return length_a - rest // 2, length_a - (rest + 1) // 2


def _truncate(tokens: list[int], new_length: int, rng: random.Random) -> list[int]:
    removed = len(tokens) - new_length
    if removed <= 0:
        return tokens
    # Each removed token comes from the front or the back with probability 1/2 (as in the original):
    # the number taken from the front is Binomial(removed, 1/2), drawn with one call.
    from_front = bin(rng.getrandbits(removed)).count("1")
    return tokens[from_front : from_front + new_length]


def _pairs_from_document(
    document_index: int,
    documents: list[list[list[int]]],
    pool: list[int],
    pool_position: int,
    max_num_tokens: int,
    short_seq_prob: float,
    rng: random.Random,
) -> list[tuple[list[int], list[int], int]]:
    """BERT's `create_instances_from_document` on token ids; returns `(tokens_a, tokens_b, label)`.

    Sentences are accumulated greedily into a chunk until it reaches the target length (max_num_tokens,
    or with probability `short_seq_prob` a random length in [2, max_num_tokens], chosen once per
    document as in the original). A ends at a random sentence boundary of the chunk. With probability
    1/2 (always when the chunk is a single sentence) B is a span from a random other document of `pool`
    starting at a random sentence, and the chunk's unused sentences are put back to start the next
    chunk; otherwise B is the rest of the chunk. The longer segment is then trimmed, token by token
    from a random end, until the pair fits. When the pool has no other document, a one-sentence chunk
    yields nothing and longer chunks always use their true continuation.
    """
    document = documents[document_index]
    target_seq_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_seq_length = rng.randint(2, max_num_tokens)

    pairs = []
    chunk: list[list[int]] = []
    chunk_length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        chunk_length += len(document[i])
        if i == len(document) - 1 or chunk_length >= target_seq_length:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = [token for sentence in chunk[:a_end] for token in sentence]
            can_draw_random = len(pool) >= 2
            if can_draw_random and (len(chunk) == 1 or rng.random() < 0.5):
                label = 1
                target_b_length = target_seq_length - len(tokens_a)
                # Uniform over the pool without the current document.
                other = rng.randrange(len(pool) - 1)
                other += other >= pool_position
                random_document = documents[pool[other]]
                tokens_b = []
                for sentence in random_document[rng.randrange(len(random_document)) :]:
                    tokens_b.extend(sentence)
                    if len(tokens_b) >= target_b_length:
                        break
                i -= len(chunk) - a_end
            elif len(chunk) >= 2:
                label = 0
                tokens_b = [token for sentence in chunk[a_end:] for token in sentence]
            else:
                label = -1
            if label >= 0:
                length_a, length_b = _truncated_lengths(len(tokens_a), len(tokens_b), max_num_tokens)
                pairs.append((_truncate(tokens_a, length_a, rng), _truncate(tokens_b, length_b, rng), label))
            chunk = []
            chunk_length = 0
        i += 1
    return pairs


def _block_bounds(num_documents: int, block: int, num_blocks: int) -> tuple[int, int]:
    return block * num_documents // num_blocks, (block + 1) * num_documents // num_blocks


def _tokenize_sentences(tokenizer: PreTrainedTokenizerBase, sentences: list[str]) -> list[list[int]]:
    if not sentences:
        return []
    if getattr(tokenizer, "is_fast", False):
        # The Rust tokenizer directly: skips offsets and the BatchEncoding conversion we do not need. Its
        # padding and truncation settings persist from whatever call used it last, so clear them first.
        backend = tokenizer.backend_tokenizer
        backend.no_padding()
        backend.no_truncation()
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [encoding.ids for encoding in encode(sentences, add_special_tokens=False)]
    return tokenizer(sentences, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def nsp_pairs_from_texts(
    texts: Sequence[str | None],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    short_seq_prob: float,
    seed: int,
    block: int,
    dupe_factor: int = 1,
) -> dict[str, np.ndarray]:
    """The NSP pairs of one block of documents (`texts`, one document each), with the block's own random generator
    (from `seed` and `block`): random B segments come from the other documents of `texts`. Columns as
    `PAIR_FEATURES`. The one recipe of both `build_nsp_pairs` (blocks of a dataset) and `stream_nsp_pairs` (blocks of
    a stream)."""
    sentences, owners = [], []
    for position, text in enumerate(texts):
        for sentence in split_sentences(text or ""):
            sentences.append(sentence)
            owners.append(position)
    token_ids = _tokenize_sentences(tokenizer, sentences)
    tokenized: list[list[list[int]]] = [[] for _ in texts]
    for owner, ids in zip(owners, token_ids):
        if ids:
            tokenized[owner].append(ids)
    pool = [position for position, document in enumerate(tokenized) if document]

    rng = random.Random(_block_seed(seed, block))
    max_num_tokens = max_seq_length - 3
    pairs = []
    for _ in range(dupe_factor):
        for pool_position, document_index in enumerate(pool):
            pairs.extend(
                _pairs_from_document(
                    document_index, tokenized, pool, pool_position, max_num_tokens, short_seq_prob, rng
                )
            )
    rng.shuffle(pairs)

    input_ids = np.full((len(pairs), max_seq_length), tokenizer.pad_token_id, dtype=np.int32)
    attention_mask = np.zeros((len(pairs), max_seq_length), dtype=np.int32)
    token_type_ids = np.zeros((len(pairs), max_seq_length), dtype=np.int32)
    labels = np.zeros(len(pairs), dtype=np.int64)
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    for row, (tokens_a, tokens_b, label) in enumerate(pairs):
        length_a, length_b = len(tokens_a), len(tokens_b)
        b_start = length_a + 2
        total = b_start + length_b + 1
        input_ids[row, :total] = [cls_id, *tokens_a, sep_id, *tokens_b, sep_id]
        attention_mask[row, :total] = 1
        token_type_ids[row, b_start:total] = 1
        labels[row] = label
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "next_sentence_label": labels,
    }


def _build_block(
    batch: dict[str, list],
    documents: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    num_blocks: int,
    max_seq_length: int,
    short_seq_prob: float,
    seed: int,
    dupe_factor: int,
) -> dict[str, Any]:
    if multiprocess.current_process().name != "MainProcess":
        # One process per core already: a Rust thread pool per worker would only oversubscribe the CPUs.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    block = batch["block"][0]
    start, end = _block_bounds(len(documents), block, num_blocks)
    texts = documents[start:end][text_column]
    return nsp_pairs_from_texts(texts, tokenizer, max_seq_length, short_seq_prob, seed, block, dupe_factor)


def _cache_file_name(dataset: datasets.Dataset, fingerprint: str, cache_dir: str | None = None) -> str | None:
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        return os.path.join(cache_dir, f"cache-{fingerprint}.arrow")
    if not dataset.cache_files:
        return None
    return os.path.join(os.path.dirname(dataset.cache_files[0]["filename"]), f"cache-{fingerprint}.arrow")


def _map_blocks(
    function: Callable[..., dict[str, Any]],
    num_blocks: int,
    source: datasets.Dataset,
    fn_kwargs: dict[str, Any],
    features: datasets.Features,
    fingerprint: str,
    num_proc: int | None,
    load_from_cache_file: bool,
    desc: str,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    # Mapping over block numbers, not over the rows of `source`, keeps every block whole whatever the
    # number of processes, which is what makes the result independent of `num_proc`.
    blocks = datasets.Dataset.from_dict({"block": list(range(num_blocks))})
    if num_proc is not None and num_proc > 1:
        num_proc = min(num_proc, num_blocks)
    return blocks.map(
        function,
        batched=True,
        batch_size=1,
        remove_columns=["block"],
        fn_kwargs=fn_kwargs,
        features=features,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        cache_file_name=_cache_file_name(source, fingerprint, cache_dir),
        new_fingerprint=fingerprint,
        load_from_cache_file=load_from_cache_file,
        desc=desc,
    )


NO_PAIRS_HINT = (
    "next-sentence prediction needs at least two documents, or a document with at least two sentences. Separate "
    "documents with blank lines (txt) or rows (csv/json), and end sentences with '.', '!' or '?' or put them on "
    "separate lines."
)


def _check_pair_options(
    documents: datasets.Dataset | datasets.IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    text_column: str,
    short_seq_prob: float,
    dupe_factor: int,
) -> None:
    if max_seq_length < 5:
        raise ValueError(f"max_seq_length={max_seq_length!r} is too short: a pair needs [CLS] A [SEP] B [SEP]")
    if not 0.0 <= short_seq_prob <= 1.0:
        raise ValueError(f"short_seq_prob={short_seq_prob!r} must be in [0, 1]")
    if dupe_factor < 1:
        raise ValueError(f"dupe_factor={dupe_factor!r} must be >= 1")
    columns = column_names_of(documents)
    if text_column not in columns:
        raise ValueError(f"text_column={text_column!r} is not a column of the documents: {columns}")
    for name in ("cls_token_id", "sep_token_id", "pad_token_id"):
        if getattr(tokenizer, name) is None:
            raise ValueError(f"The tokenizer has no {name[:-3]}: NSP pairs need [CLS], [SEP] and [PAD] tokens")


def build_nsp_pairs(
    documents: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    text_column: str = "text",
    short_seq_prob: float = 0.1,
    seed: int = 42,
    num_proc: int | None = None,
    dupe_factor: int = 1,
    load_from_cache_file: bool = True,
    source: str = "",
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Build BERT next-sentence-prediction pairs from a dataset of documents (one per row).

    Returns a dataset with exactly the columns `input_ids`, `attention_mask`, `token_type_ids` (int32
    lists of length `max_seq_length`, `[CLS] A [SEP] B [SEP]` padded with the tokenizer's pad id, token
    type 0 for CLS+A+SEP and 1 for B+SEP, 0 on padding) and `next_sentence_label` (0 = B continues A,
    1 = B is from another document, as transformers' BERT expects). The recipe is the published
    BERT one on token ids; see `_pairs_from_document`. Random B segments come from another document
    of the same block of `DOCUMENTS_PER_BLOCK` documents, so pairs are reproducible for a given `seed`
    whatever `num_proc` is. `dupe_factor` repeats the pass over the documents with fresh random choices.
    Results are cached in `cache_dir` when given, else next to `documents`' cache files when it has any.

    Raises ValueError when no pair can be built, e.g. from a single document of one sentence; `source` (e.g.
    "--train_file corpus.txt") names the documents in that message.
    """
    _check_pair_options(documents, tokenizer, max_seq_length, text_column, short_seq_prob, dupe_factor)
    if len(documents) == 0:
        raise ValueError("There are no documents: nothing to pretrain on")

    num_blocks = max(1, len(documents) // DOCUMENTS_PER_BLOCK)
    fingerprint = Hasher.hash(
        [_RECIPE_VERSION, dataset_fingerprint(documents), text_column, tokenizer, max_seq_length, short_seq_prob,
         seed, dupe_factor, DOCUMENTS_PER_BLOCK]
    )
    pairs = _map_blocks(
        _build_block,
        num_blocks,
        documents,
        fn_kwargs={
            "documents": documents,
            "tokenizer": tokenizer,
            "text_column": text_column,
            "num_blocks": num_blocks,
            "max_seq_length": max_seq_length,
            "short_seq_prob": short_seq_prob,
            "seed": seed,
            "dupe_factor": dupe_factor,
        },
        features=PAIR_FEATURES,
        fingerprint=fingerprint,
        num_proc=num_proc,
        load_from_cache_file=load_from_cache_file,
        desc="Building NSP sentence pairs",
        cache_dir=cache_dir,
    )
    if len(pairs) == 0:
        raise ValueError(
            f"No sentence pairs could be built from {f'{source}: ' if source else ''}{len(documents)} document(s): "
            f"{NO_PAIRS_HINT}"
        )
    random_fraction = pyarrow.compute.mean(pairs.data.column("next_sentence_label")).as_py()
    logger.info(
        "Built %d sentence pairs from %d documents (%.1f%% with a random next sentence)",
        len(pairs), len(documents), 100 * random_fraction,
    )
    if not 0.4 <= random_fraction <= 0.6:
        # The recipe forces a random B whenever a chunk is a single sentence, so short documents skew it.
        logger.warning(
            "%.1f%% of the pairs have a random next sentence, far from 50%%: documents are short or have few "
            "sentences compared with max_seq_length=%d. Longer documents (separated by blank lines) balance it.",
            100 * random_fraction, max_seq_length,
        )
    return pairs


# ---------------------------------------------------------------------------------------------------
# Sentence pairs from a stream of documents (--streaming)
# ---------------------------------------------------------------------------------------------------


def _build_streamed_block(
    batch: dict[str, list],
    indices: list[int],
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    max_seq_length: int,
    short_seq_prob: float,
    seed: int,
    dupe_factor: int,
    first_block: int,
) -> dict[str, Any]:
    block = first_block + indices[0] // DOCUMENTS_PER_BLOCK
    pairs = nsp_pairs_from_texts(batch[text_column], tokenizer, max_seq_length, short_seq_prob, seed, block, dupe_factor)
    return {name: values.tolist() for name, values in pairs.items()}  # rows as a Dataset gives them: lists, not arrays


def stream_nsp_pairs(
    documents: datasets.IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    text_column: str = "text",
    short_seq_prob: float = 0.1,
    seed: int = 42,
    dupe_factor: int = 1,
    first_block: int = 0,
) -> datasets.IterableDataset:
    """`build_nsp_pairs` for a stream of documents: the pairs are built as the stream is read, one block of
    `DOCUMENTS_PER_BLOCK` consecutive documents at a time, with the same recipe and per-block seeds
    (`nsp_pairs_from_texts`); `first_block` numbers the stream's first block (for a stream that starts after the
    blocks held out by `hold_out_nsp_pairs`).

    The stream's size is unknown, so its blocks are exactly `DOCUMENTS_PER_BLOCK` documents (the last one shorter),
    where `build_nsp_pairs` spreads the remainder over its blocks: the pairs are the same when the number of
    documents is at most `DOCUMENTS_PER_BLOCK` or a multiple of it; otherwise the block boundaries, and so the pools of
    random B segments, differ. A stream without a single pair is found when it is first read (see
    `data.require_samples`), with `NO_PAIRS_HINT`.
    """
    _check_pair_options(documents, tokenizer, max_seq_length, text_column, short_seq_prob, dupe_factor)
    return documents.map(
        _build_streamed_block,
        batched=True,
        batch_size=DOCUMENTS_PER_BLOCK,
        with_indices=True,
        remove_columns=column_names_of(documents),
        features=PAIR_FEATURES,
        fn_kwargs={
            "tokenizer": tokenizer,
            "text_column": text_column,
            "max_seq_length": max_seq_length,
            "short_seq_prob": short_seq_prob,
            "seed": seed,
            "dupe_factor": dupe_factor,
            "first_block": first_block,
        },
    )


def hold_out_nsp_pairs(
    documents: datasets.IterableDataset,
    num_pairs: int,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    text_column: str = "text",
    short_seq_prob: float = 0.1,
    seed: int = 42,
    dupe_factor: int = 1,
    source: str = "the documents",
) -> tuple[datasets.Dataset, datasets.IterableDataset]:
    """Evaluation pairs held out of a stream of documents that has no validation split: the first `num_pairs` pairs
    of `stream_nsp_pairs(documents)` as a Dataset, and the stream of pairs for training, which starts after the
    blocks those came from. Whole blocks are held out because a block's pairs share its documents (their random B
    segments too): no document is both evaluated and trained on. Raises ValueError, naming `source` and
    --max_eval_samples, when that leaves no document to train on."""
    _check_pair_options(documents, tokenizer, max_seq_length, text_column, short_seq_prob, dupe_factor)
    held_out: list[dict[str, np.ndarray]] = []
    count = blocks = num_documents = 0
    for batch in documents.iter(batch_size=DOCUMENTS_PER_BLOCK):
        pairs = nsp_pairs_from_texts(batch[text_column], tokenizer, max_seq_length, short_seq_prob, seed, blocks,
                                     dupe_factor)
        held_out.append(pairs)
        count += len(pairs["next_sentence_label"])
        blocks += 1
        num_documents += len(batch[text_column])
        if count >= num_pairs:
            break
    if num_documents < blocks * DOCUMENTS_PER_BLOCK or first_example(documents.skip(num_documents)) is None:
        raise ValueError(
            f"--max_eval_samples {num_pairs} with --streaming and no validation data holds out all {num_documents} "
            f"documents of {source} ({count} pairs; pairs are held out in whole blocks of {DOCUMENTS_PER_BLOCK} "
            "documents, so that no document is both evaluated and trained on): nothing is left to train on. Give "
            "--validation_file, more documents, or a smaller --max_eval_samples"
        )
    columns = {name: np.concatenate([pairs[name] for pairs in held_out])[:num_pairs] if held_out else []
               for name in PAIR_FEATURES}
    evaluation = datasets.Dataset.from_dict({name: list(values) for name, values in columns.items()},
                                            features=PAIR_FEATURES)
    logger.info("--streaming: %d sentence pairs of the first %d block(s) of %d documents are held out for evaluation; "
                "training starts after them", len(evaluation), blocks, DOCUMENTS_PER_BLOCK)
    training = stream_nsp_pairs(documents.skip(blocks * DOCUMENTS_PER_BLOCK), tokenizer, max_seq_length, text_column,
                                short_seq_prob, seed, dupe_factor, first_block=blocks)
    return evaluation, training


# ---------------------------------------------------------------------------------------------------
# Static masking
# ---------------------------------------------------------------------------------------------------


def _mask_block(
    batch: dict[str, list],
    pairs: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    mlm_probability: float,
    max_seq_length: int,
    seed: int,
    mask_input_ids: bool,
) -> dict[str, Any]:
    if multiprocess.current_process().name != "MainProcess":
        # datasets forks its workers; if the parent already ran torch ops, its OpenMP thread pool does not
        # survive the fork and the first multi-threaded op in the child hangs. PyTorch's DataLoader
        # workers do the same. Blocks are small and the workers already use every core.
        torch.set_num_threads(1)
    block = batch["block"][0]
    rows = pairs.with_format("numpy")[block * PAIRS_PER_MASKING_BLOCK : (block + 1) * PAIRS_PER_MASKING_BLOCK]
    input_ids = np.stack(rows["input_ids"]) if rows["input_ids"].dtype == object else rows["input_ids"]
    collator = DataCollatorForLanguageModelingWithMaxTokensMasked(
        tokenizer=tokenizer, mlm_probability=mlm_probability, max_seq_length=max_seq_length
    )
    collator.generator = torch.Generator().manual_seed(_block_seed("mask", seed, block))
    masked, labels = collator.torch_mask_tokens(torch.from_numpy(input_ids.astype(np.int64)))
    attention_mask = rows["attention_mask"]
    attention_mask = np.stack(attention_mask) if attention_mask.dtype == object else attention_mask
    return {
        "input_ids": masked.numpy() if mask_input_ids else input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": rows["token_type_ids"],
        "labels": labels.numpy(),
        "next_sentence_label": rows["next_sentence_label"],
        LENGTH_COLUMN: attention_mask.sum(axis=1, dtype=np.int32),
    }


def add_mlm_labels(
    pairs: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    mlm_probability: float = 0.15,
    seed: int = 42,
    mask_input_ids: bool = False,
    num_proc: int | None = None,
    load_from_cache_file: bool = True,
) -> datasets.Dataset:
    """Add a seeded static-masking `labels` column (the pre-built datasets' order of columns) and the pairs' lengths
    (`LENGTH_COLUMN`, for --packing).

    Masking uses `DataCollatorForLanguageModelingWithMaxTokensMasked` at the pairs' sequence length, on
    fixed blocks of `PAIRS_PER_MASKING_BLOCK` rows each with its own seed, so it is reproducible whatever
    `num_proc`. `labels` holds the original id at masked positions and -100 elsewhere. With
    `mask_input_ids=False` the stored `input_ids` stay the unmasked originals, which is what dynamic
    masking (the trainer's default) needs; with True they hold the masked ids, for `--is_already_masked`.
    """
    if len(pairs) == 0:
        raise ValueError("There are no sentence pairs to mask")
    max_seq_length = len(pairs[0]["input_ids"])
    num_blocks = -(-len(pairs) // PAIRS_PER_MASKING_BLOCK)
    fingerprint = Hasher.hash(
        [_RECIPE_VERSION, "mask", dataset_fingerprint(pairs), tokenizer, mlm_probability, seed, mask_input_ids,
         PAIRS_PER_MASKING_BLOCK, LENGTH_COLUMN]
    )
    return _map_blocks(
        _mask_block,
        num_blocks,
        pairs,
        fn_kwargs={
            "pairs": pairs,
            "tokenizer": tokenizer,
            "mlm_probability": mlm_probability,
            "max_seq_length": max_seq_length,
            "seed": seed,
            "mask_input_ids": mask_input_ids,
        },
        features=MASKED_PAIR_FEATURES,
        fingerprint=fingerprint,
        num_proc=num_proc,
        load_from_cache_file=load_from_cache_file,
        desc="Masking tokens for MLM labels",
    )
