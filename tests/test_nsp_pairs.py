"""NSP sentence pairs: the BERT recipe, the pre-built datasets' columns, determinism, document loading and edge cases."""

import csv
import json
import logging
import random
import re

import datasets
import numpy as np
import pytest

from ipu_trainer.data.collators import max_num_masked_tokens
from ipu_trainer.data.nsp_pairs import (
    DOCUMENTS_PER_BLOCK,
    _truncated_lengths,
    add_mlm_labels,
    build_nsp_pairs,
    dataset_fingerprint,
    hold_out_nsp_pairs,
    load_text_documents,
    split_sentences,
    stream_nsp_pairs,
)

MAX_SEQ_LENGTH = 64
WORDS = "the value of a function is returned object class module name list method type string number".split()
# Every sentence starts with its identity, so a decoded segment tells which document and line it came
# from. "says" is required so a number cut by truncation ("line 1" of "line 12") never matches.
IDENTITY = re.compile(r"document (\d+) line (\d+) says")


def synthetic_documents(num_documents: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    documents = []
    for document in range(num_documents):
        sentences = [
            f"Document {document} line {line} says {' '.join(rng.choices(WORDS, k=rng.randint(2, 8)))}."
            for line in range(rng.randint(3, 10))
        ]
        documents.append(" ".join(sentences))
    return documents


@pytest.fixture(scope="module")
def documents():
    return datasets.Dataset.from_dict({"text": synthetic_documents()})


@pytest.fixture(scope="module")
def pairs(documents, tokenizer):
    return build_nsp_pairs(documents, tokenizer, MAX_SEQ_LENGTH, seed=42)


def segments(row, tokenizer):
    """Split one row into (A ids, B ids), checking the [CLS] A [SEP] B [SEP] [PAD]... layout on the way."""
    ids, mask, types = row["input_ids"], row["attention_mask"], row["token_type_ids"]
    assert len(ids) == len(mask) == len(types) == MAX_SEQ_LENGTH
    length = sum(mask)
    assert mask == [1] * length + [0] * (MAX_SEQ_LENGTH - length)
    assert ids[length:] == [tokenizer.pad_token_id] * (MAX_SEQ_LENGTH - length)
    assert ids[0] == tokenizer.cls_token_id
    separators = [position for position in range(length) if ids[position] == tokenizer.sep_token_id]
    assert len(separators) == 2 and separators[1] == length - 1
    first_sep = separators[0]
    assert types == [0] * (first_sep + 1) + [1] * (length - first_sep - 1) + [0] * (MAX_SEQ_LENGTH - length)
    assert tokenizer.cls_token_id not in ids[1:length]
    tokens_a, tokens_b = ids[1:first_sep], ids[first_sep + 1 : length - 1]
    assert tokens_a and tokens_b
    return tokens_a, tokens_b


def identities(token_ids, tokenizer) -> list[tuple[int, int]]:
    return [(int(d), int(line)) for d, line in IDENTITY.findall(tokenizer.decode(token_ids))]


def test_columns_are_exactly_spec(pairs):
    assert pairs.column_names == ["input_ids", "attention_mask", "token_type_ids", "next_sentence_label"]
    assert set(pairs["next_sentence_label"]) == {0, 1}


def test_label_balance_near_half(pairs):
    labels = np.array(pairs["next_sentence_label"])
    assert len(labels) >= 400
    assert 0.4 <= labels.mean() <= 0.6, labels.mean()


def test_layout_and_provenance_of_every_pair(pairs, tokenizer):
    checked_adjacent = 0
    for row in pairs:
        tokens_a, tokens_b = segments(row, tokenizer)
        ids_a, ids_b = identities(tokens_a, tokenizer), identities(tokens_b, tokenizer)
        assert ids_a and ids_b, tokenizer.decode(tokens_a + tokens_b)
        docs_a, docs_b = {d for d, _ in ids_a}, {d for d, _ in ids_b}
        assert len(docs_a) == 1 and len(docs_b) == 1
        lines_a, lines_b = [line for _, line in ids_a], [line for _, line in ids_b]
        # Each segment is a contiguous span of its document.
        assert lines_a == list(range(lines_a[0], lines_a[0] + len(lines_a)))
        assert lines_b == list(range(lines_b[0], lines_b[0] + len(lines_b)))
        if row["next_sentence_label"] == 0:
            assert docs_a == docs_b
            # B comes after A; truncation may trim A's end or B's start, so only an untruncated pair
            # (shorter than the maximum) must be exactly adjacent.
            assert lines_b[0] > lines_a[-1]
            if sum(row["attention_mask"]) < MAX_SEQ_LENGTH:
                assert lines_b[0] == lines_a[-1] + 1
                checked_adjacent += 1
        else:
            assert docs_a != docs_b
    assert checked_adjacent > 50


def test_random_next_sentences_come_from_the_other_documents_of_the_same_block(documents, pairs, tokenizer):
    """The rule, written from its statement: documents are cut into len // DOCUMENTS_PER_BLOCK blocks of consecutive
    documents, block k holding documents [k * N // blocks, (k + 1) * N // blocks); a random B comes from another
    document of A's block (what bounds the memory by the block, as Google's tool drew from its own input shard), drawn
    uniformly, so it reaches across the block rather than only its neighbours."""
    num_blocks = len(documents) // DOCUMENTS_PER_BLOCK
    assert num_blocks == 2
    block_of = {d: b for b in range(num_blocks)
                for d in range(b * len(documents) // num_blocks, (b + 1) * len(documents) // num_blocks)}
    reached = {b: set() for b in range(num_blocks)}
    for row in pairs:
        if row["next_sentence_label"] == 1:
            tokens_a, tokens_b = segments(row, tokenizer)
            (doc_a,), (doc_b,) = {d for d, _ in identities(tokens_a, tokenizer)}, {d for d, _ in identities(tokens_b, tokenizer)}
            assert doc_a != doc_b and block_of[doc_a] == block_of[doc_b]
            reached[block_of[doc_b]].add(doc_b)
    for block, found in reached.items():
        size = sum(1 for b in block_of.values() if b == block)
        assert len(found) > size / 3 and max(found) - min(found) > 0.9 * size


def test_deterministic_and_independent_of_num_proc(documents, pairs, tokenizer):
    parallel = build_nsp_pairs(documents, tokenizer, MAX_SEQ_LENGTH, seed=42, num_proc=2)
    parallel_again = build_nsp_pairs(documents, tokenizer, MAX_SEQ_LENGTH, seed=42, num_proc=2)
    assert parallel.to_dict() == parallel_again.to_dict()
    assert parallel.to_dict() == pairs.to_dict()
    other_seed = build_nsp_pairs(documents, tokenizer, MAX_SEQ_LENGTH, seed=43)
    assert other_seed["input_ids"] != pairs["input_ids"]


def test_a_stream_of_documents_gives_the_same_pairs_in_the_same_order(documents, tokenizer):
    """With a multiple of DOCUMENTS_PER_BLOCK documents the stream's blocks are the dataset's blocks: same documents,
    same seeds, so the same pairs (random B segments included)."""
    two_blocks = documents.select(range(2 * DOCUMENTS_PER_BLOCK))
    expected = build_nsp_pairs(two_blocks, tokenizer, MAX_SEQ_LENGTH, seed=42).to_list()
    streamed = stream_nsp_pairs(two_blocks.to_iterable_dataset(), tokenizer, MAX_SEQ_LENGTH, seed=42)
    assert list(streamed) == expected
    assert list(stream_nsp_pairs(two_blocks.to_iterable_dataset(), tokenizer, MAX_SEQ_LENGTH, seed=43)) != expected

    # Held out for evaluation: the first pairs, and training starts at the next block (no document in both).
    first_block = len(build_nsp_pairs(documents.select(range(DOCUMENTS_PER_BLOCK)), tokenizer, MAX_SEQ_LENGTH, seed=42))
    evaluation, training = hold_out_nsp_pairs(two_blocks.to_iterable_dataset(), 10, tokenizer, MAX_SEQ_LENGTH, seed=42)
    assert evaluation.to_list() == expected[:10]
    assert list(training) == expected[first_block:]
    one_block = documents.select(range(DOCUMENTS_PER_BLOCK)).to_iterable_dataset()
    with pytest.raises(ValueError, match=f"--max_eval_samples 10 .* holds out all {DOCUMENTS_PER_BLOCK} documents"):
        hold_out_nsp_pairs(one_block, 10, tokenizer, MAX_SEQ_LENGTH, seed=42)


def test_dupe_factor_and_short_sequences(documents, pairs, tokenizer):
    doubled = build_nsp_pairs(documents, tokenizer, MAX_SEQ_LENGTH, seed=42, dupe_factor=2)
    assert 1.7 * len(pairs) < len(doubled) < 2.3 * len(pairs)
    always_short = build_nsp_pairs(documents, tokenizer, MAX_SEQ_LENGTH, seed=42, short_seq_prob=1.0)
    never_short = build_nsp_pairs(documents, tokenizer, MAX_SEQ_LENGTH, seed=42, short_seq_prob=0.0)
    assert np.mean(always_short["attention_mask"]) < np.mean(never_short["attention_mask"])


def naive_truncated_lengths(length_a, length_b, max_num_tokens):
    while length_a + length_b > max_num_tokens:
        if length_a > length_b:
            length_a -= 1
        else:
            length_b -= 1
    return length_a, length_b


def test_truncated_lengths_match_bert_truncate_seq_pair():
    for length_a in range(1, 40):
        for length_b in range(1, 40):
            for max_num_tokens in (2, 5, 13, 30, 61):
                assert _truncated_lengths(length_a, length_b, max_num_tokens) == naive_truncated_lengths(
                    length_a, length_b, max_num_tokens
                )


def test_split_sentences():
    text = 'First one. Second? "Quoted." Third! e.g. lower stays\nline two\n\n  4 items. Done.'
    assert split_sentences(text) == [
        "First one.",
        "Second?",
        '"Quoted."',
        "Third! e.g. lower stays",
        "line two",
        "4 items.",
        "Done.",
    ]


def test_static_mlm_labels(pairs, tokenizer):
    labelled = add_mlm_labels(pairs, tokenizer, mlm_probability=0.15, seed=1)
    assert labelled.column_names == ["input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label",
                                     "length"]
    assert labelled["input_ids"] == pairs["input_ids"]  # unmasked originals, for dynamic masking
    assert labelled["length"] == [sum(mask) for mask in pairs["attention_mask"]]  # real tokens, for --packing
    ids, labels = np.array(labelled["input_ids"]), np.array(labelled["labels"])
    masked = labels != -100
    assert 0.1 < masked.sum() / np.array(labelled["attention_mask"]).sum() < 0.2
    assert (labels[masked] == ids[masked]).all()
    special = np.isin(ids, tokenizer.all_special_ids)
    assert not (masked & special).any()
    assert masked.sum(axis=1).max() <= max_num_masked_tokens(MAX_SEQ_LENGTH, 0.15)
    assert add_mlm_labels(pairs, tokenizer, seed=1, num_proc=2)["labels"] == labelled["labels"]

    static = add_mlm_labels(pairs, tokenizer, seed=1, mask_input_ids=True)
    static_ids = np.array(static["input_ids"])
    assert (static_ids[~masked] == ids[~masked]).all()
    assert (static_ids[masked] == tokenizer.mask_token_id).mean() > 0.7


# ---- loading documents ---------------------------------------------------------------------------


def test_txt_documents_are_blank_line_separated(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("Doc one sentence one.\nDoc one line two.\n\n\n  \nDoc two.\r\n\r\nDoc three. Ends.\n", newline="")
    loaded = load_text_documents({"train": str(path)}, cache_dir=str(tmp_path / "cache"))
    assert loaded["train"]["text"] == [
        "Doc one sentence one.\nDoc one line two.",
        "Doc two.",
        "Doc three. Ends.",
    ]
    streamed = load_text_documents({"train": str(path)}, streaming=True)["train"]
    assert isinstance(streamed, datasets.IterableDataset)
    assert [row["text"] for row in streamed] == loaded["train"]["text"]


def test_csv_and_json_one_document_per_row(tmp_path):
    csv_path = tmp_path / "docs.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows([[1, "First doc. Two sentences."], [2, "Second doc."]])
    json_path = tmp_path / "docs.json"
    json_path.write_text("\n".join(json.dumps({"text": t}) for t in ["A doc.", "B doc."]))
    loaded = load_text_documents({"train": [str(csv_path)], "validation": str(json_path)}, cache_dir=str(tmp_path))
    assert loaded["train"].column_names == ["text"]
    assert loaded["train"]["text"] == ["First doc. Two sentences.", "Second doc."]
    assert loaded["validation"]["text"] == ["A doc.", "B doc."]
    streamed = load_text_documents({"train": [str(csv_path)], "validation": str(json_path)}, streaming=True)
    assert {name: list(split) for name, split in streamed.items()} == {name: split.to_list() for name, split in loaded.items()}

    no_text = tmp_path / "no_text.csv"
    no_text.write_text("body\nhello\n")
    with pytest.raises(ValueError, match="no 'text' column"):
        load_text_documents({"train": str(no_text)}, cache_dir=str(tmp_path))


def test_empty_missing_and_unsupported_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(ValueError, match=r"empty\.txt is empty \(or only blank lines\): nothing to train on"):
        load_text_documents({"train": str(empty)})
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text_documents({"train": str(tmp_path / "missing.txt")})
    parquet = tmp_path / "data.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="unsupported extension 'parquet'"):
        load_text_documents({"train": str(parquet)})


def test_non_utf8_bytes_warn_and_are_replaced(tmp_path, caplog):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Caf\xe9 au lait. Tr\xe8s bien.\n\nSecond document here.\n".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="ipu_trainer.data.nsp_pairs"):
        loaded = load_text_documents({"train": str(path)}, cache_dir=str(tmp_path / "cache"))
    assert any("latin1.txt is not valid UTF-8" in record.getMessage() for record in caplog.records)
    assert loaded["train"]["text"] == ["Caf\ufffd au lait. Tr\ufffds bien.", "Second document here."]

    csv_path = tmp_path / "latin1.csv"
    csv_path.write_bytes("text\nCaf\xe9 noir.\n".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="ipu_trainer.data.nsp_pairs"):
        loaded = load_text_documents({"train": str(csv_path)}, cache_dir=str(tmp_path / "cache"))
    assert any("latin1.csv is not valid UTF-8" in record.getMessage() for record in caplog.records)
    assert loaded["train"]["text"] == ["Caf\ufffd noir."]


def test_single_one_sentence_document_is_a_clear_error(tmp_path, tokenizer):
    path = tmp_path / "one.txt"
    path.write_text("Just one sentence and nothing else.\n")
    documents = load_text_documents({"train": str(path)}, cache_dir=str(tmp_path / "cache"))["train"]
    with pytest.raises(ValueError, match="No sentence pairs could be built from 1 document.*at least two documents"):
        build_nsp_pairs(documents, tokenizer, MAX_SEQ_LENGTH)


def test_single_document_yields_only_true_continuations(tokenizer):
    documents = datasets.Dataset.from_dict({"text": [" ".join(f"Sentence number {i} is here." for i in range(40))]})
    single = build_nsp_pairs(documents, tokenizer, MAX_SEQ_LENGTH)
    assert len(single) > 3
    assert set(single["next_sentence_label"]) == {0}


def test_cached_result_tracks_file_changes(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    cache = str(tmp_path / "cache")
    path.write_text("\n\n".join(synthetic_documents(20)))
    first = build_nsp_pairs(load_text_documents({"train": str(path)}, cache_dir=cache)["train"], tokenizer, 64)
    again = build_nsp_pairs(load_text_documents({"train": str(path)}, cache_dir=cache)["train"], tokenizer, 64)
    assert again.to_dict() == first.to_dict() and again.cache_files == first.cache_files
    path.write_text("\n\n".join(synthetic_documents(30, seed=5)))
    changed = build_nsp_pairs(load_text_documents({"train": str(path)}, cache_dir=cache)["train"], tokenizer, 64)
    assert changed["input_ids"] != first["input_ids"]


def test_invalid_arguments(documents, tokenizer):
    with pytest.raises(ValueError, match="max_seq_length=4"):
        build_nsp_pairs(documents, tokenizer, 4)
    with pytest.raises(ValueError, match="text_column='body'"):
        build_nsp_pairs(documents, tokenizer, 64, text_column="body")
    with pytest.raises(ValueError, match="no documents"):
        build_nsp_pairs(documents.select([]), tokenizer, 64)


def test_unused_sentences_are_put_back(documents, tokenizer):
    # After a random B, the chunk's sentences after A start the next chunk (as in the original), so with
    # documents that fit a sequence every sentence ends up in a segment of its own document. Dropping
    # them instead would lose about a quarter of the text.
    long_pairs = build_nsp_pairs(documents, tokenizer, 256, seed=42, short_seq_prob=0.0)
    covered = set()
    for row in long_pairs:
        ids, length = row["input_ids"], sum(row["attention_mask"])
        first_sep = ids.index(tokenizer.sep_token_id)
        covered.update(identities(ids[1:first_sep], tokenizer))
        if row["next_sentence_label"] == 0:
            covered.update(identities(ids[first_sep + 1 : length - 1], tokenizer))
    total = sum(len(IDENTITY.findall(text.lower())) for text in documents["text"])
    assert len(covered) / total > 0.98


def test_pairs_do_not_depend_on_the_tokenizers_last_padding_or_truncation(documents, pairs, tokenizer):
    # A fast tokenizer keeps the padding/truncation of its last call in its Rust backend.
    tokenizer(["some text"], padding="max_length", truncation=True, max_length=8)
    again = build_nsp_pairs(documents, tokenizer, MAX_SEQ_LENGTH, seed=42, load_from_cache_file=False)
    assert again["input_ids"] == pairs["input_ids"]
    assert again["next_sentence_label"] == pairs["next_sentence_label"]


def test_dataset_fingerprint_touchpoint_follows_the_content():
    """pretraining_data.dataset_fingerprint reads datasets' private Dataset._fingerprint."""
    first, same, other = (datasets.Dataset.from_dict({"text": texts}) for texts in (["a b"], ["a b"], ["a c"]))
    assert isinstance(dataset_fingerprint(first), str)
    assert dataset_fingerprint(first) == dataset_fingerprint(same) != dataset_fingerprint(other)
