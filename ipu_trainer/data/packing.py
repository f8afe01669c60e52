"""Packed sequences: several sequences in one row of `max_seq_length`, so no compute is spent on padding.

Three parts, used together by the scripts' `--packing` mode:

1. `pack_sequences(lengths, max_length)`: which sequences share a row. A best-fit-decreasing bin packing
   run on the histogram of lengths rather than on the sequences one by one (see its docstring), so it
   costs O(N) numpy work plus a loop whose length depends on the number of distinct lengths and pack
   shapes, not on N: tens of millions of sequences pack in seconds. Deterministic for a given seed.
2. `PackedDataset`: a map-style dataset whose items are packed rows (lists of the source's examples),
   built from the plan without copying the data. `len()` counts rows, so a micro-batch is a number of
   packed rows.
3. `DataCollatorForPackedSequences`: turns a batch of packed rows into the tensors the packed models take
   (`ipu_trainer.models`): `input_ids`, `token_type_ids`, `position_ids` restarting at 0 in every sequence,
   `sequence_ids` (1, 2, ... per sequence of a row, 0 on padding; the models build the block-diagonal
   attention mask from them), MLM `labels` and, for NSP data, `next_sentence_label` and `cls_positions`
   ([rows, max_sequences_per_row], -100 / 0 on unused slots).

Masking and the masked-LM cap. Dynamic masking stays the masking collator's job: each sequence is masked
on its own, exactly as without packing (same 80/10/10 rule, same per-sequence cap `max_num_masked_tokens`,
computed from the un-packed `max_seq_length`). The model gathers a static K labelled positions per *row*
(on accelerators and in evaluation), so a packed row must not carry more than K labels: K is the same
formula over the row's `max_seq_length` positions (a row holds at most that many tokens, so the masked
count of a row is bounded like that of one full-length sequence), and the rare row over it (~2%, as the
per-sequence cap) keeps a uniformly random K of its labels; the others are unmasked (original token back,
label -100). With `--is_already_masked` the stored labels go through the same row cap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch

from ..models.layers import IGNORE_INDEX
from .collators import content_seeded_generator, keep_at_most

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# The packing plan
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackingPlan:
    """Which source sequences share each row, in compressed-row form.

    Row r holds the sequences `sequence_order[row_offsets[r]:row_offsets[r + 1]]` (indices into the source,
    longest first). `lengths` are the source sequences' lengths, `max_length` the row length.
    """

    sequence_order: np.ndarray
    row_offsets: np.ndarray
    lengths: np.ndarray
    max_length: int

    @property
    def num_rows(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_order)

    @property
    def sequences_per_row(self) -> float:
        """Average number of sequences in a row."""
        return self.num_sequences / max(self.num_rows, 1)

    @property
    def max_sequences_in_a_row(self) -> int:
        return int(np.diff(self.row_offsets).max()) if self.num_rows else 0

    @property
    def efficiency(self) -> float:
        """Real tokens over row positions: tokens / (rows x max_length)."""
        return float(self.lengths.sum()) / max(self.num_rows * self.max_length, 1)

    @property
    def padding_before(self) -> float:
        """The padding fraction of the same sequences each padded to `max_length` (one per row)."""
        return 1.0 - float(self.lengths.sum()) / max(len(self.lengths) * self.max_length, 1)

    @property
    def min_rows(self) -> int:
        """A lower bound on the rows of any packing: all tokens over the row length, and one row for each
        sequence longer than half a row (no two of those fit together)."""
        tokens = int(self.lengths.sum())
        return max(-(-tokens // self.max_length), int((2 * self.lengths > self.max_length).sum()))

    def row(self, index: int) -> np.ndarray:
        return self.sequence_order[self.row_offsets[index] : self.row_offsets[index + 1]]

    def describe(self) -> str:
        return (
            f"{self.num_sequences} sequences in {self.num_rows} rows of {self.max_length} (no packing needs fewer "
            f"than {self.min_rows}): "
            f"{self.sequences_per_row:.2f} sequences per row on average (at most {self.max_sequences_in_a_row}), "
            f"packing efficiency {self.efficiency:.1%} (padding {1 - self.efficiency:.1%}, "
            f"{self.padding_before:.1%} without packing)"
        )


def pack_sequences(
    lengths: Sequence[int] | np.ndarray,
    max_length: int,
    max_sequences_per_row: int | None = None,
    seed: int = 0,
) -> PackingPlan:
    """Bin-pack sequences of the given `lengths` into rows of `max_length` tokens.

    Best-fit decreasing on the histogram of lengths: lengths are visited from the longest to the shortest;
    each sequence goes into the open row with the least free space that still fits it, or starts a new row.
    Rows with the same contents so far ("pack shapes", e.g. (100, 20)) are interchangeable, so the algorithm
    places sequences into whole groups of identical rows at once, with the same outcome as one sequence at
    a time: its loop runs over (length, group) pairs, independent of the number of sequences. Which sequence of a given length fills which row is decided afterwards by a
    seeded permutation, in O(N) vectorised numpy (the lengths are radix-sorted), and the rows are shuffled
    with the same generator.

    Complexity: O(N) time and memory for N sequences, plus O(L x G) for the histogram loop (L = max_length,
    G = distinct pack shapes, in practice a few hundred to a few thousand). Best-fit decreasing packs within
    11/9 of the optimal number of rows plus a constant; on BERT-style length distributions the padding left
    is a few percent at most.

    `max_sequences_per_row` (None = no limit) caps the number of sequences in a row. The result depends
    only on the lengths, `max_length`, the limit and `seed`.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {lengths.shape}")
    if max_length < 1:
        raise ValueError(f"max_length={max_length!r} must be >= 1")
    if max_sequences_per_row is not None and max_sequences_per_row < 1:
        raise ValueError(f"max_sequences_per_row={max_sequences_per_row!r} must be >= 1 (or None for no limit)")
    if len(lengths) and (lengths.min() < 1 or lengths.max() > max_length):
        raise ValueError(
            f"sequence lengths must be in [1, {max_length}], found {int(lengths.min())}..{int(lengths.max())}"
        )
    lengths = lengths.astype(np.int64)
    limit = max_sequences_per_row or max_length
    shapes = _pack_histogram(np.bincount(lengths, minlength=max_length + 1), max_length, limit)
    return _assign_sequences(shapes, lengths, max_length, np.random.default_rng(seed))


def _pack_histogram(histogram: np.ndarray, max_length: int, limit: int) -> list[tuple[tuple[int, ...], int]]:
    """The histogram loop of `pack_sequences`: [(pack shape, number of rows with that shape)]."""
    # open_groups[space] maps a pack shape to how many open rows have it; every row of a shape has the same
    # free space. A dict keeps insertion order, so the choice among equal-space groups is deterministic.
    open_groups: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_length + 1)]
    has_open = np.zeros(max_length + 1, dtype=bool)
    closed: dict[tuple[int, ...], int] = {}

    def add(shape: tuple[int, ...], count: int, space: int) -> None:
        if space == 0 or len(shape) == limit:
            closed[shape] = closed.get(shape, 0) + count
        else:
            open_groups[space][shape] = open_groups[space].get(shape, 0) + count
            has_open[space] = True

    for length in range(max_length, 0, -1):
        remaining = int(histogram[length])
        while remaining:
            # Best fit: the open rows with the least free space that holds this length, else fresh rows. The
            # sequence after this one (same length) fits the same row again while space remains, since that
            # row then has even less free space: a row takes `per_row` of them before the next row starts.
            fitting = np.flatnonzero(has_open[length:])
            if len(fitting):
                space = length + int(fitting[0])
                groups = open_groups[space]
                shape, available = next(iter(groups.items()))
            else:
                space, shape, available = max_length, (), None  # as many fresh rows as needed
            per_row = min(space // length, limit - len(shape))
            rows = remaining // per_row if available is None else min(available, remaining // per_row)
            placed = per_row
            if rows == 0:  # fewer sequences left than one row takes: they all go into one row
                rows, placed = 1, remaining
            if available is not None:
                if rows == available:
                    del groups[shape]
                    has_open[space] = bool(groups)
                else:
                    groups[shape] = available - rows
            add(shape + (length,) * placed, rows, space - placed * length)
            remaining -= rows * placed
    result = list(closed.items())
    for groups in open_groups:
        result.extend(groups.items())
    return result


def _assign_sequences(
    shapes: list[tuple[tuple[int, ...], int]], lengths: np.ndarray, max_length: int, rng: np.random.Generator
) -> PackingPlan:
    # Sequences grouped by length, each group in a seeded random order: a permutation, then a stable sort
    # by length (a radix sort for integer keys of 16 bits or less).
    permutation = rng.permutation(len(lengths))
    key_type = np.uint16 if max_length < 2**16 else np.int64
    by_length = permutation[np.argsort(lengths[permutation].astype(key_type), kind="stable")]
    next_of_length = np.concatenate([[0], np.cumsum(np.bincount(lengths, minlength=max_length + 1))])[:-1]

    index_type = np.int32 if len(lengths) < 2**31 else np.int64
    blocks, sizes = [], []
    for shape, count in shapes:
        block = np.empty((count, len(shape)), dtype=index_type)
        for column, length in enumerate(shape):
            start = next_of_length[length]
            block[:, column] = by_length[start : start + count]
            next_of_length[length] = start + count
        blocks.append(block.reshape(-1))
        sizes.append(np.full(count, len(shape), dtype=np.int64))
    order = np.concatenate(blocks) if blocks else np.empty(0, dtype=index_type)
    row_sizes = np.concatenate(sizes) if sizes else np.empty(0, dtype=np.int64)

    # Rows in a seeded random order (compressed-row gather, O(N)).
    row_permutation = rng.permutation(len(row_sizes))
    starts = np.concatenate([[0], np.cumsum(row_sizes)])[:-1]
    new_sizes = row_sizes[row_permutation]
    new_offsets = np.concatenate([[0], np.cumsum(new_sizes)])
    gather = np.repeat(starts[row_permutation] - new_offsets[:-1], new_sizes) + np.arange(len(order))
    return PackingPlan(
        sequence_order=order[gather], row_offsets=new_offsets, lengths=lengths, max_length=max_length
    )


# ---------------------------------------------------------------------------------------------------
# Lengths of a dataset's sequences
# ---------------------------------------------------------------------------------------------------


# The column prepare_dataset.py writes with each pair's number of real tokens (the sum of its attention_mask):
# transformers' own name for precomputed lengths (`TrainingArguments.length_column_name`). With it, planning the
# packing reads 4 bytes per row instead of every row's attention_mask (5 GB for 10 million rows of 128).
LENGTH_COLUMN = "length"
# Rows whose stored length is checked against their attention_mask before it is trusted for the rest.
CHECKED_LENGTH_ROWS = 1000


def sequence_lengths(dataset: Any) -> np.ndarray:
    """Real tokens of every row: its `LENGTH_COLUMN` when it has one, else the sum of its `attention_mask`
    (right-padded rows), else its `input_ids` length.

    A `datasets.Dataset` is read straight from its Arrow columns in blocks, in O(total tokens) numpy work and
    one block of memory (O(rows) with a length column, whose first `CHECKED_LENGTH_ROWS` values are checked against
    the attention mask); other datasets (sequences of dicts) are read row by row.
    """
    if not isinstance(dataset, datasets.Dataset):
        return np.array([_checked_length(example) for example in dataset], dtype=np.int64)
    if LENGTH_COLUMN in dataset.column_names and "attention_mask" in dataset.column_names:
        stored = _column_lengths(dataset, LENGTH_COLUMN)
        checked = _column_lengths(dataset.select(range(min(len(dataset), CHECKED_LENGTH_ROWS))), "attention_mask")
        if not np.array_equal(stored[: len(checked)], checked):
            raise ValueError(
                f"the data's {LENGTH_COLUMN!r} column does not hold the sum of each row's attention_mask: rebuild it "
                f"with prepare_dataset.py, or remove the column (dataset.remove_columns({LENGTH_COLUMN!r})) so that "
                "--packing computes the lengths itself"
            )
        return stored
    return _column_lengths(dataset, "attention_mask" if "attention_mask" in dataset.column_names else "input_ids")


def _column_lengths(dataset: datasets.Dataset, column: str) -> np.ndarray:
    """Per row: the value of an integer `column`, the sum of `attention_mask`, or the length of `input_ids`."""
    arrow = dataset.with_format("arrow")
    pieces = []
    block = 1 << 16
    for start in range(0, len(dataset), block):
        values = arrow[start : start + block][column].combine_chunks()
        if column == LENGTH_COLUMN:
            pieces.append(values.to_numpy(zero_copy_only=False).astype(np.int64))
            continue
        counts = pc.list_value_length(values).to_numpy(zero_copy_only=False).astype(np.int64)
        if column == "input_ids":
            pieces.append(counts)
            continue
        flat = values.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        sums = np.zeros(len(counts), dtype=np.int64)
        nonempty = counts > 0
        if nonempty.any():
            starts = np.concatenate([[0], np.cumsum(counts)])[:-1]
            sums[nonempty] = np.add.reduceat(flat, starts[nonempty])
        pieces.append(sums)
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------
# Packed dataset
# ---------------------------------------------------------------------------------------------------


class PackedDataset(torch.utils.data.Dataset):
    """Packed rows over `source`: item r is the list of the source examples of row r (see `PackingPlan`).

    Nothing is copied: rows are assembled when a batch is fetched (with one `__getitems__` call on the
    source for the whole batch when it has one, as `datasets.Dataset` does).

    Several processes (torchrun): nothing here depends on the process. Every process packs the same data
    with the same seed into the same rows, and the trainer's distributed sampler hands each process its
    share of row indices, as for any map-style dataset; a resumed run re-packs into the same rows and skips
    the rows already trained on, as it skips samples without packing.
    """

    def __init__(self, source: Any, plan: PackingPlan) -> None:
        if plan.num_sequences != len(source):
            raise ValueError(f"the packing plan covers {plan.num_sequences} sequences but the dataset has {len(source)}")
        self.source = source
        self.plan = plan

    def __len__(self) -> int:
        return self.plan.num_rows

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[list[dict[str, Any]]]:
        rows = [self.plan.row(int(index)) for index in indices]
        flat = [int(i) for row in rows for i in row]
        if hasattr(self.source, "__getitems__"):
            examples = self.source.__getitems__(flat)
        else:
            examples = [self.source[i] for i in flat]
        result, start = [], 0
        for row in rows:
            result.append(examples[start : start + len(row)])
            start += len(row)
        return result


def pack_dataset(
    dataset: Any, max_length: int, max_sequences_per_row: int | None = None, seed: int = 0, name: str = "train"
) -> PackedDataset:
    """`dataset` packed into rows of `max_length` (see `pack_sequences`); logs the packing efficiency."""
    started = time.perf_counter()
    plan = pack_sequences(sequence_lengths(dataset), max_length, max_sequences_per_row, seed)
    logger.info("Packed the %s data in %.1f s: %s", name, time.perf_counter() - started, plan.describe())
    return PackedDataset(dataset, plan)


# ---------------------------------------------------------------------------------------------------
# Collating packed rows
# ---------------------------------------------------------------------------------------------------


@dataclass
class DataCollatorForPackedSequences:
    """Batches of packed rows (lists of examples) -> the packed models' tensors (module docstring).

    Args:
        max_seq_length: the row length L.
        pad_token_id: the id written on padding positions.
        masking: a masking collator (e.g. `DataCollatorForLanguageModelingWithMaxTokensMasked`) whose
            `torch_mask_tokens` masks the batch's sequences, each on its own; None keeps the examples' own
            `labels` (pre-masked data, `--is_already_masked`), or trains without MLM labels if they have none.
        max_num_masked_tokens: labels allowed in one row (the model's static K); None for no row cap.
        max_sequences_per_row: width of `next_sentence_label` / `cls_positions`, fixed so every batch has one
            shape; None takes the batch's largest row.
        seed: seeds the row cap's choice, from the seed and the batch's content (as the masking collator does),
            so a resumed run caps alike.
    """

    max_seq_length: int
    pad_token_id: int
    masking: Any | None = None
    max_num_masked_tokens: int | None = None
    max_sequences_per_row: int | None = None
    seed: int = 0

    def __call__(self, rows: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, torch.Tensor]:
        rows = [list(row) for row in rows]
        sequences = [example for row in rows for example in row]
        if not sequences:
            raise ValueError("a batch of packed rows holds no sequences")
        # Per sequence: its length, its row, its index in the row and its first column there. Plain Python: a
        # batch has tens of sequences, and small torch index ops cost more than the whole loop.
        length_list, row_list, index_list, offset_list = [], [], [], []
        for row_index, row in enumerate(rows):
            used = 0
            for index_in_row, example in enumerate(row):
                length = _checked_length(example)
                length_list.append(length)
                row_list.append(row_index)
                index_list.append(index_in_row)
                offset_list.append(used)
                used += length
            if used > self.max_seq_length:
                raise ValueError(f"a packed row holds {used} tokens, more than max_seq_length={self.max_seq_length}")
        lengths, row_of = torch.tensor(length_list), torch.tensor(row_list)
        index_in_row, offsets = torch.tensor(index_list), torch.tensor(offset_list)

        # The batch's sequences, each padded to the longest ([N, S]) and masked each on its own.
        longest = int(lengths.max())
        real = torch.arange(longest).unsqueeze(0) < lengths.unsqueeze(1)
        input_ids = _padded(sequences, lengths, "input_ids", longest, self.pad_token_id)
        token_type_ids = _padded(sequences, lengths, "token_type_ids", longest, 0)
        labels = None
        if self.masking is not None:
            special = _padded(sequences, lengths, "special_tokens_mask", longest, 1)
            input_ids, labels = self.masking.torch_mask_tokens(input_ids, special_tokens_mask=special)
            labels = labels.masked_fill(~real, IGNORE_INDEX)
        elif "labels" in sequences[0]:
            labels = _padded(sequences, lengths, "labels", longest, IGNORE_INDEX)

        # Where the tokens go: the sequence's row, at its offset in the row (the lengths of the sequences before
        # it in that row) plus the token's position in the sequence.
        positions = torch.arange(longest).expand(len(sequences), -1)
        target_rows = row_of.unsqueeze(1).expand(-1, longest)[real]
        target_columns = (offsets.unsqueeze(1) + positions)[real]

        def scatter(values: torch.Tensor, fill: int) -> torch.Tensor:
            out = torch.full((len(rows), self.max_seq_length), fill, dtype=torch.long)
            out[target_rows, target_columns] = values[real].long()
            return out

        batch = {
            "input_ids": scatter(input_ids, self.pad_token_id),
            "token_type_ids": scatter(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids), 0),
            "position_ids": scatter(positions, 0),
            "sequence_ids": scatter((index_in_row + 1).unsqueeze(1).expand(-1, longest), 0),
        }
        if labels is not None:
            batch["labels"] = scatter(labels, IGNORE_INDEX)
            if self.max_num_masked_tokens is not None:
                self._cap_labels_per_row(batch["input_ids"], batch["labels"])

        if "next_sentence_label" in sequences[0]:
            fullest = max(len(row) for row in rows)
            width = self.max_sequences_per_row or fullest
            if fullest > width:
                raise ValueError(f"a packed row holds {fullest} sequences, more than max_sequences_per_row={width}")
            next_sentence_label = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            cls_positions = torch.zeros((len(rows), width), dtype=torch.long)
            next_sentence_label[row_of, index_in_row] = torch.tensor([int(e["next_sentence_label"]) for e in sequences])
            cls_positions[row_of, index_in_row] = offsets
            batch["next_sentence_label"] = next_sentence_label
            batch["cls_positions"] = cls_positions
        return batch

    def _cap_labels_per_row(self, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep a uniformly random `max_num_masked_tokens` of the labels of any row that has more; the others are
        unmasked in place (original id back, label -100), by the masking collator's rule (`keep_at_most`)."""
        cap = self.max_num_masked_tokens
        labelled = labels != IGNORE_INDEX
        if cap >= labels.shape[1] or int(labelled.sum(1).max()) <= cap:
            return
        kept = keep_at_most(labelled, cap, content_seeded_generator(self.seed, input_ids, purpose="row-cap"))
        dropped = labelled & ~kept
        input_ids[dropped] = labels[dropped]
        labels[dropped] = IGNORE_INDEX


def _padded(
    sequences: list[Mapping[str, Any]], lengths: torch.Tensor, key: str, width: int, fill: int
) -> torch.Tensor | None:
    """Column `key` of the sequences, each cut to its length and padded to `width`: [N, width]; None if absent."""
    if key not in sequences[0]:
        return None
    out = torch.full((len(sequences), width), fill, dtype=torch.long)
    for i, (example, length) in enumerate(zip(sequences, lengths.tolist())):
        out[i, :length] = torch.as_tensor(example[key][:length], dtype=torch.long)
    return out


def _checked_length(example: Mapping[str, Any]) -> int:
    """A sequence's real length; its attention mask must be ones on those first tokens (right padding)."""
    if "attention_mask" not in example:
        return len(example["input_ids"])
    mask = example["attention_mask"]
    length = int(sum(mask))
    if length and not all(mask[:length]):
        raise ValueError("packing needs right-padded sequences (real tokens first, then padding)")
    return length


def pack_for_training(
    train_dataset: Any,
    eval_dataset: Any,
    max_seq_length: int,
    pad_token_id: int,
    masking: Any | None,
    max_num_masked_tokens: int | None,
    max_sequences_per_row: int | None = None,
    seed: int = 0,
    placement: Any | None = None,
) -> tuple[PackedDataset | None, PackedDataset | None, DataCollatorForPackedSequences]:
    """The scripts' `--packing`: the train and eval datasets packed, and the collator for their rows.

    `masking` is the masking collator (dynamic masking) or None (the data's own labels, `--is_already_masked`);
    `max_num_masked_tokens` is the model's static K, applied per row. The NSP columns get one width for every
    batch: `max_sequences_per_row`, else the fullest row of either dataset. With the run's training
    `placement`, the log says how many sequences a micro-batch and a weight update carry on average.
    """
    packed = {
        name: pack_dataset(dataset, max_seq_length, max_sequences_per_row, seed, name)
        for name, dataset in (("train", train_dataset), ("eval", eval_dataset)) if dataset is not None
    }
    width = max_sequences_per_row or max((dataset.plan.max_sequences_in_a_row for dataset in packed.values()), default=1)
    if "train" in packed and placement is not None:
        per_row = packed["train"].plan.sequences_per_row
        logger.info(
            "--packing: a micro-batch is %d packed rows (~%.1f sequences), a weight update %d rows (~%.0f sequences); "
            "%.2f sequences per row on average",
            placement.micro_batch_size, placement.micro_batch_size * per_row, placement.samples_per_update,
            placement.samples_per_update * per_row, per_row,
        )
    collator = DataCollatorForPackedSequences(
        max_seq_length=max_seq_length, pad_token_id=pad_token_id, masking=masking,
        max_num_masked_tokens=max_num_masked_tokens, max_sequences_per_row=width, seed=seed,
    )
    return packed.get("train"), packed.get("eval"), collator
