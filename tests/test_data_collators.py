import pickle

import ipu_trainer.data_collators as data_collators_module

import pytest
import torch

from ipu_trainer.data_collators import (
    DataCollatorForLanguageModelingWithMaxTokensMasked,
    max_num_masked_tokens,
    pad_on_batch_axis,
)


def fixed_length_rows(tokenizer, documents, sequence_length):
    """[CLS] block [SEP] rows cut from the concatenated documents, as the pretraining data has them."""
    ids = [i for doc in tokenizer(documents, add_special_tokens=False)["input_ids"] for i in doc]
    block = sequence_length - 2
    rows = []
    for start in range(0, len(ids) - block + 1, block):
        row = [tokenizer.cls_token_id, *ids[start : start + block], tokenizer.sep_token_id]
        rows.append({"input_ids": row, "token_type_ids": [0] * len(row), "attention_mask": [1] * len(row)})
    return rows


@pytest.fixture(scope="module")
def rows128(tokenizer, english_documents):
    return fixed_length_rows(tokenizer, english_documents, 128)


def collate(tokenizer, examples, **kwargs):
    collator = DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, seed=0, **kwargs)
    original = torch.tensor([e["input_ids"] for e in examples])
    return collator(examples), original


@pytest.mark.parametrize(
    "length,probability,expected",
    [
        (128, 0.15, 32),  # SPEC §6
        (512, 0.15, 96),  # mean 76.8, std 8.08 -> 92.96 -> 96
        (20, 0.5, 16),  # mean 10, std 2.24 -> 14.5 -> 16
        (10, 0.5, 10),  # rounding up to 16 is capped at L
    ],
)
def test_max_num_masked_tokens_formula(length, probability, expected):
    assert max_num_masked_tokens(length, probability) == expected


def test_collator_owns_max_num_masked_tokens(tokenizer):
    def make(**kwargs):
        return DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, **kwargs)

    assert make(max_seq_length=128, mlm_probability=0.15).max_num_masked_tokens == 32
    assert make(max_seq_length=128, mlm_probability=0.15, max_num_masked_tokens=20).max_num_masked_tokens == 20
    assert make(max_num_masked_tokens=7).max_num_masked_tokens == 7
    assert make(mlm_probability=0.15).max_num_masked_tokens is None  # each batch's length decides
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"max_num_masked_tokens={bad!r} must be a whole number >= 1"):
            make(max_num_masked_tokens=bad)


def test_cap_is_computed_once_at_construction(tokenizer, rows128, monkeypatch):
    calls = []
    original = data_collators_module.max_num_masked_tokens

    def counting(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(data_collators_module, "max_num_masked_tokens", counting)
    collator = DataCollatorForLanguageModelingWithMaxTokensMasked(
        tokenizer, mlm_probability=0.15, max_seq_length=128, seed=0
    )
    for start in (0, 8, 16):
        collator(rows128[start : start + 8])
    assert calls == [(128, 0.15)]


def test_explicit_cap_is_the_one_the_masking_uses(tokenizer, rows128):
    # With p=0.5, L=128 would give a cap of 96; the explicit 10 binds on every row.
    batch, _ = collate(tokenizer, rows128, mlm_probability=0.5, max_seq_length=128, max_num_masked_tokens=10)
    counts = (batch["labels"] != -100).sum(dim=1)
    assert counts.max() == 10 and (counts == 10).float().mean() > 0.95


def test_cap_binds_and_keeps_a_random_subset(tokenizer, rows128):
    # max_seq_length=32 with p=0.5 gives a cap of 32 while ~63 tokens per 128-token row are chosen.
    cap = max_num_masked_tokens(32, 0.5)
    batch, _ = collate(tokenizer, rows128, mlm_probability=0.5, max_seq_length=32)
    counts = (batch["labels"] != -100).sum(dim=1)
    assert counts.max() <= cap
    assert (counts == cap).float().mean() > 0.95
    # Uniform trimming keeps positions from the whole row, not the first `cap` candidates.
    positions = (batch["labels"] != -100).nonzero()[:, 1].float()
    assert 55 < positions.mean() < 73


def test_default_cap_uses_batch_length(tokenizer, rows128):
    batch, _ = collate(tokenizer, rows128, mlm_probability=0.6)
    cap = max_num_masked_tokens(128, 0.6)  # 96: mean 76.8 + 2 std 11.1 = 87.9 -> 96
    counts = (batch["labels"] != -100).sum(dim=1)
    assert counts.max() <= cap
    assert counts.float().mean() > 0.55 * 126


def test_special_and_padding_tokens_never_masked(tokenizer, english_documents):
    examples = [tokenizer(doc, truncation=True, max_length=96) for doc in english_documents[:64]]
    assert len({len(e["input_ids"]) for e in examples}) > 1  # dynamic padding is exercised
    collator = DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, mlm_probability=0.9, seed=0)
    batch = collator(examples)
    original = tokenizer.pad(examples, return_tensors="pt")["input_ids"]
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    assert (original == tokenizer.pad_token_id).any() and (original == tokenizer.cls_token_id).all(dim=0)[0]
    assert (batch["labels"][special] == -100).all()
    assert torch.equal(batch["input_ids"][special], original[special])
    # with p=0.9 almost every ordinary token is chosen, so the check above is not vacuous
    assert (batch["labels"][~special] != -100).float().mean() > 0.8


def test_labels_and_80_10_10_split(tokenizer, rows128):
    batch, original = collate(tokenizer, rows128, mlm_probability=0.5)
    labels, inputs = batch["labels"], batch["input_ids"]
    masked = labels != -100
    assert masked.sum() >= 20_000
    # labels: the original id where masked, -100 exactly elsewhere; unmasked inputs untouched
    assert torch.equal(labels[masked], original[masked])
    assert (labels[~masked] == -100).all()
    assert torch.equal(inputs[~masked], original[~masked])

    n = masked.sum().item()
    to_mask = (inputs[masked] == tokenizer.mask_token_id).sum().item() / n
    unchanged = (inputs[masked] == original[masked]).sum().item() / n
    randomised = 1 - to_mask - unchanged
    assert abs(to_mask - 0.8) < 0.02
    assert abs(unchanged - 0.1) < 0.02
    assert abs(randomised - 0.1) < 0.02


def test_stored_labels_are_replaced_and_extra_columns_pass_through(tokenizer, rows128):
    examples = [
        dict(row, labels=[7] * len(row["input_ids"]), next_sentence_label=i % 2) for i, row in enumerate(rows128[:16])
    ]
    batch, original = collate(tokenizer, examples, mlm_probability=0.15)
    masked = batch["labels"] != -100
    assert masked.any() and (batch["labels"][~masked] == -100).all()
    assert torch.equal(batch["labels"][masked], original[masked])
    assert torch.equal(batch["next_sentence_label"], torch.tensor([i % 2 for i in range(16)]))
    assert torch.equal(batch["token_type_ids"], torch.tensor([e["token_type_ids"] for e in examples]))
    assert torch.equal(batch["attention_mask"], torch.tensor([e["attention_mask"] for e in examples]))


def test_ragged_stored_labels_are_replaced(tokenizer, english_documents):
    examples = [
        dict(tokenizer(doc, truncation=True, max_length=40), labels=[5] * (i + 1))
        for i, doc in enumerate(english_documents[:8])
    ]
    collator = DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, seed=0)
    batch = collator(examples)
    assert batch["labels"].shape == batch["input_ids"].shape
    assert not (batch["labels"] == 5).all(dim=1).any()


def test_pad_on_batch_axis_repeats_cyclically():
    examples = [{"input_ids": [i, i], "label": i} for i in range(3)]
    collator = pad_on_batch_axis(8)
    batch = collator(examples)
    assert batch["input_ids"].shape == (8, 2)
    assert batch["labels"].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    full = [{"input_ids": [i, i], "label": i} for i in range(8)]
    assert collator(full)["labels"].tolist() == list(range(8))
    # picklable, for DataLoader workers started with spawn
    assert pickle.loads(pickle.dumps(collator))(examples)["labels"].shape == (8,)


def test_pad_on_batch_axis_wraps_the_masking_collator(tokenizer, rows128):
    masking = DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, seed=0)
    batch = pad_on_batch_axis(8, masking)(rows128[:3])
    assert batch["input_ids"].shape == (8, 128) and batch["labels"].shape == (8, 128)
    assert torch.equal(batch["attention_mask"][3], torch.tensor(rows128[0]["attention_mask"]))


def test_seeded_masking_depends_on_the_batch_not_on_the_global_rng(tokenizer, rows128):
    def mask(rows, seed):
        return DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, seed=seed)(rows)

    torch.manual_seed(0)
    first = mask(rows128[:16], seed=3)
    state_after = torch.get_rng_state()
    torch.manual_seed(123)  # another global RNG state must not change the masks
    second = mask(rows128[:16], seed=3)
    assert torch.equal(first["labels"], second["labels"]) and torch.equal(first["input_ids"], second["input_ids"])
    torch.manual_seed(0)
    mask(rows128[:16], seed=3)
    assert torch.equal(torch.get_rng_state(), state_after)  # nothing was drawn from the global RNG

    assert not torch.equal(first["labels"], mask(rows128[:16], seed=4)["labels"])
    reordered = mask(rows128[1:16] + rows128[:1], seed=3)  # same rows, another batch: new masks
    assert not torch.equal(first["labels"][1:], reordered["labels"][:15])
