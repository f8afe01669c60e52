import math
import pickle

import ipu_trainer.data.collators as data_collators_module

import pytest
import torch

from ipu_trainer import IPUConfig, IPUTrainingArguments
from ipu_trainer.data.collators import (
    DataCollatorForLanguageModelingWithMaxTokensMasked,
    max_num_masked_tokens,
    pad_on_batch_axis,
    pad_to_multiple_of_for,
)
from ipu_trainer.run import precision as precision_module
from ipu_trainer.run.resolved_run import resolve_run


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
        (128, 0.15, 32),  # the original's cap at length 128
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


def test_the_cap_from_max_seq_length_binds_on_every_batch_whatever_its_length(tokenizer, rows128):
    # Set once at construction: L=20, p=0.5 gives 16, while the batches' own lengths would give 96 (128) and 48 (64)
    # and p=0.5 chooses ~63 and ~31 tokens a row.
    collator = DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, mlm_probability=0.5, max_seq_length=20,
                                                                  seed=0)
    assert collator.max_num_masked_tokens == 16
    short_rows = [{key: value[:64] for key, value in row.items()} for row in rows128[8:16]]
    for examples in (rows128[:8], short_rows, rows128[16:24]):
        counts = (collator(examples)["labels"] != -100).sum(dim=1)
        assert counts.max() == 16 and (counts == 16).all()
    assert collator.max_num_masked_tokens == 16


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


# ---- whole-word masking ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_tokenizer(assets):
    """The quick start's byte-level BPE tokenizer with the mask and pad tokens a masked LM needs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["bpe_tokenizer"])
    tokenizer.add_special_tokens({"mask_token": "<mask>", "pad_token": "<pad>"})
    return tokenizer


@pytest.fixture(scope="module")
def bpe_rows128(bpe_tokenizer, english_documents):
    """<|endoftext|> block <|endoftext|> rows, so that special tokens sit inside the words' neighbourhood."""
    ids = [i for doc in bpe_tokenizer(english_documents)["input_ids"] for i in doc]
    edge = bpe_tokenizer.eos_token_id
    return [{"input_ids": [edge, *ids[start : start + 126], edge]} for start in range(0, len(ids) - 126, 126)]


def reference_words(tokenizer, row):
    """The words of one row as lists of positions, by the conventions spelled out token by token."""
    tokens = tokenizer.convert_ids_to_tokens(row)
    special = set(tokenizer.all_special_tokens)
    wordpiece = sum(t.startswith("##") for t in tokenizer.get_vocab()) > 100
    words, previous = [], None
    for position, token in enumerate(tokens):
        if token in special:
            previous = None
            continue
        if wordpiece:
            continues = token.startswith("##")
        else:
            continues = not token.startswith(("Ġ", "Ċ", "ĉ", "č")) and not previous.endswith(("Ċ", "ĉ", "č")) \
                if previous is not None else False
        if continues and previous is not None:
            words[-1].append(position)
        else:
            words.append([position])
        previous = token
    return words


def whole_word_batch(tokenizer, examples, **kwargs):
    collator = DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, seed=0, whole_word_mask=True, **kwargs)
    original = tokenizer.pad([{"input_ids": e["input_ids"]} for e in examples], return_tensors="pt")["input_ids"]
    return collator(examples), original


def masked_words(tokenizer, batch, original):
    """(labelled words, words labelled in part) over the batch, each word as (row, positions)."""
    labelled, partial = [], []
    for row in range(len(original)):
        is_labelled = (batch["labels"][row] != -100).tolist()
        for word in reference_words(tokenizer, original[row].tolist()):
            flags = {is_labelled[p] for p in word}
            if flags == {True}:
                labelled.append((row, word))
            elif len(flags) == 2:
                partial.append((row, word))
    return labelled, partial


@pytest.fixture(params=["wordpiece", "byte-level-bpe"])
def tokenizer_and_rows(request, tokenizer, rows128, bpe_tokenizer, bpe_rows128):
    return (tokenizer, rows128) if request.param == "wordpiece" else (bpe_tokenizer, bpe_rows128)


def test_word_index_finds_the_words_token_by_token(tokenizer_and_rows):
    tokenizer, rows = tokenizer_and_rows
    examples = [{"input_ids": r["input_ids"]} for r in rows[:40]]
    examples += [{"input_ids": r["input_ids"][: 20 + i]} for i, r in enumerate(rows[40:80])]  # padded rows
    inputs = tokenizer.pad(examples, return_tensors="pt")["input_ids"]
    maskable = ~torch.isin(inputs, torch.tensor(tokenizer.all_special_ids))
    index = data_collators_module.WordBoundaries.of(tokenizer).word_index(inputs, maskable)
    assert (index[~maskable] == -1).all()
    for row in range(len(inputs)):
        words = {}
        for position, word in enumerate(index[row].tolist()):
            if word >= 0:
                words.setdefault(word, []).append(position)
        assert sorted(words) == list(range(len(words)))
        assert list(words.values()) == reference_words(tokenizer, inputs[row].tolist())


def test_whole_words_are_labelled_together(tokenizer_and_rows):
    tokenizer, rows = tokenizer_and_rows
    batch, original = whole_word_batch(tokenizer, rows, mlm_probability=0.15, max_num_masked_tokens=128)
    labelled, partial = masked_words(tokenizer, batch, original)
    assert partial == []
    multi_token = [w for _, w in labelled if len(w) > 1]
    assert len(multi_token) > 200  # words of several pieces are there and get masked
    # Every labelled position belongs to a labelled word, and the labels are the original ids.
    assert sum(len(w) for _, w in labelled) == (batch["labels"] != -100).sum().item()
    masked = batch["labels"] != -100
    assert torch.equal(batch["labels"][masked], original[masked])
    # Each word is chosen with probability p, so p of the tokens are labelled (no cap binds at 128).
    maskable = ~torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    assert abs(masked.sum().item() / maskable.sum().item() - 0.15) < 0.015


def test_whole_word_cap_keeps_whole_words_and_never_exceeds(tokenizer_and_rows):
    tokenizer, rows = tokenizer_and_rows
    batch, original = whole_word_batch(tokenizer, rows, mlm_probability=0.5, max_num_masked_tokens=10)
    counts = (batch["labels"] != -100).sum(dim=1)
    assert counts.max() == 10 and counts.float().mean() > 8  # the cap binds on every row, and is filled
    labelled, partial = masked_words(tokenizer, batch, original)
    assert partial == []  # trimming to the cap removed whole words only
    # The words kept are a random choice, not the row's first ones.
    positions = torch.tensor([p for _, word in labelled for p in word], dtype=torch.float)
    assert 50 < positions.mean() < 78


def test_whole_word_80_10_10_split_is_per_word(tokenizer_and_rows):
    tokenizer, rows = tokenizer_and_rows
    batch, original = whole_word_batch(tokenizer, rows, mlm_probability=0.5)
    inputs = batch["input_ids"]
    labelled, partial = masked_words(tokenizer, batch, original)
    assert partial == [] and len(labelled) > 10_000
    kinds = {"mask": 0, "unchanged": 0, "random": 0}
    mixed = 0
    for row, word in labelled:
        now, before = inputs[row, word], original[row, word]
        if (now == tokenizer.mask_token_id).all():
            kinds["mask"] += 1
        elif torch.equal(now, before):
            kinds["unchanged"] += 1
        else:
            kinds["random"] += 1
            # A randomised word has no token left as [MASK] or as it was, but for a random id that happens to be
            # one of them (1 in the vocabulary size per token).
            mixed += bool(((now == tokenizer.mask_token_id) | (now == before)).any())
    total = len(labelled)
    assert abs(kinds["mask"] / total - 0.8) < 0.02
    assert abs(kinds["unchanged"] / total - 0.1) < 0.015
    assert abs(kinds["random"] / total - 0.1) < 0.015
    assert mixed <= 0.02 * kinds["random"]


def test_whole_word_masking_leaves_special_and_padding_tokens(tokenizer, bpe_tokenizer, english_documents):
    for tok in (tokenizer, bpe_tokenizer):
        edge = [tok.bos_token_id] if tok.cls_token_id is None else []
        examples = [{"input_ids": edge + tok(doc, truncation=True, max_length=60)["input_ids"] + edge}
                    for doc in english_documents[:64]]
        assert len({len(e["input_ids"]) for e in examples}) > 1  # dynamic padding is exercised
        batch, original = whole_word_batch(tok, examples, mlm_probability=0.9)
        special = torch.isin(original, torch.tensor(tok.all_special_ids))
        assert (original == tok.pad_token_id).any() and special[:, 0].all()
        assert (batch["labels"][special] == -100).all()
        assert torch.equal(batch["input_ids"][special], original[special])
        assert (batch["labels"][~special] != -100).float().mean() > 0.5  # not vacuous


def test_whole_word_masking_is_seeded_by_the_batch(tokenizer, rows128):
    def mask(rows, seed):
        collator = DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, seed=seed, whole_word_mask=True)
        return collator(rows)

    torch.manual_seed(0)
    first = mask(rows128[:16], seed=3)
    state_after = torch.get_rng_state()
    torch.manual_seed(123)
    second = mask(rows128[:16], seed=3)
    assert torch.equal(first["labels"], second["labels"]) and torch.equal(first["input_ids"], second["input_ids"])
    torch.manual_seed(0)
    mask(rows128[:16], seed=3)
    assert torch.equal(torch.get_rng_state(), state_after)
    assert not torch.equal(first["labels"], mask(rows128[:16], seed=4)["labels"])


def test_the_collator_masks_by_the_vocabularys_word_boundaries_in_every_batch(tokenizer, rows128):
    whole_words = DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, mlm_probability=0.5, seed=0,
                                                                     whole_word_mask=True)
    table = data_collators_module.WordBoundaries.of(tokenizer)
    assert torch.equal(whole_words.word_boundaries.continues, table.continues)
    assert torch.equal(whole_words.word_boundaries.ends, table.ends)
    for start in (0, 8, 16):
        examples = rows128[start : start + 8]
        batch = whole_words(examples)
        original = torch.tensor([e["input_ids"] for e in examples])
        assert masked_words(tokenizer, batch, original)[1] == []  # no word labelled in part
    # Token masking has no word table, and labels the pieces of a word independently.
    tokens = DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, mlm_probability=0.5, seed=0)
    assert tokens.word_boundaries is None
    batch = tokens(rows128[:8])
    assert masked_words(tokenizer, batch, torch.tensor([e["input_ids"] for e in rows128[:8]]))[1] != []


def test_word_boundaries_tables(tokenizer, bpe_tokenizer):
    wordpiece = data_collators_module.WordBoundaries.of(tokenizer)
    vocab = tokenizer.get_vocab()
    assert wordpiece.continues[vocab["##s"]] and not wordpiece.continues[vocab["the"]]
    assert not wordpiece.ends.any()

    bpe = data_collators_module.WordBoundaries.of(bpe_tokenizer)
    vocab = bpe_tokenizer.get_vocab()
    assert not bpe.continues[vocab["Ġthe"]] and bpe.continues[vocab["s"]] and bpe.continues[vocab[","]]
    # A line break starts a word, and the token after one does too.
    assert not bpe.continues[vocab["Ċ"]] and bpe.ends[vocab["Ċ"]] and not bpe.ends[vocab["Ġthe"]]
    ids = bpe_tokenizer("one\nword", add_special_tokens=False)["input_ids"]
    tokens = bpe_tokenizer.convert_ids_to_tokens(ids)
    assert tokens[1] == "Ċ" and not tokens[2].startswith("Ġ")
    batch, _ = whole_word_batch(bpe_tokenizer, [{"input_ids": ids}] * 400, mlm_probability=0.5)
    labelled = batch["labels"] != -100
    assert (labelled[:, 1] != labelled[:, 2]).any()  # the word after the line break is masked on its own


def test_whole_word_mask_needs_word_markers_and_mlm(tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "[MASK]": 1, "[PAD]": 2, "hello": 3, "world": 4}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", mask_token="[MASK]", pad_token="[PAD]")
    with pytest.raises(ValueError, match="--whole_word_mask: the vocabulary of .* has no word markers"):
        DataCollatorForLanguageModelingWithMaxTokensMasked(word_level, whole_word_mask=True)
    with pytest.raises(ValueError, match="whole_word_mask=True needs mlm=True"):
        DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, mlm=False, whole_word_mask=True)
    # Upstream's whole-word set-up (every chosen token to [MASK]) is not applied.
    collator = DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, whole_word_mask=True)
    assert (collator.mask_replace_prob, collator.random_replace_prob) == (0.8, 0.1)


# ---- padding to a multiple of 8 in half precision on a GPU ---------------------------------------------------


def test_dynamic_padding_rounds_up_to_the_multiple(tokenizer, english_documents):
    examples = [tokenizer(doc, truncation=True, max_length=61) for doc in english_documents[:40]]
    lengths = {len(e["input_ids"]) for e in examples}
    assert max(lengths) % 8  # rounding up is needed
    collator = DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, seed=0, pad_to_multiple_of=8)
    for start in range(0, 40, 8):
        batch = collator(examples[start : start + 8])
        longest = max(len(e["input_ids"]) for e in examples[start : start + 8])
        assert batch["input_ids"].shape[1] == math.ceil(longest / 8) * 8
        padding = batch["attention_mask"] == 0
        assert (batch["labels"][padding] == -100).all()


def resolved(tmp_path, **flags):
    args = IPUTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **flags)
    return resolve_run(IPUConfig(layers_per_ipu=[-1]), args)


def test_padding_multiple_is_8_for_half_precision_on_a_gpu_only(tmp_path, monkeypatch):
    assert pad_to_multiple_of_for(resolved(tmp_path, fp32=True)) is None
    monkeypatch.setattr(precision_module, "cpu_has_fast_bfloat16", lambda: True)
    cpu_bf16 = resolved(tmp_path)
    assert cpu_bf16.precision.mixed_precision == "bf16" and pad_to_multiple_of_for(cpu_bf16) is None

    # The GPU facts the run is resolved from, simulated: the device, and whether it has native bfloat16.
    monkeypatch.setattr(IPUTrainingArguments, "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert pad_to_multiple_of_for(resolved(tmp_path, fp32=True)) is None
    for native_bfloat16, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(precision_module, "cuda_has_native_bfloat16", lambda: native_bfloat16)
        run = resolved(tmp_path)
        assert run.args.device.type == "cuda" and run.precision.mixed_precision == expected
        assert pad_to_multiple_of_for(run) == 8
        assert pad_to_multiple_of_for(run, max_length=128) == 8
        # Rounding a batch of a length near 100 up to 104 could pass --max_seq_length 100 (and the positions).
        assert pad_to_multiple_of_for(run, max_length=100) is None
