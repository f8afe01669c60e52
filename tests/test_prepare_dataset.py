"""prepare_dataset.py end to end (in-process, patched sys.argv), its error handling, tfrecord input, and
a smoke run of bench/preprocess.py so the benchmark cannot rot."""

import json
import os
import runpy
import socket
import subprocess
import sys

import datasets
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import prepare_dataset  # noqa: E402

PRETRAINING_COLUMNS = ["input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label", "length"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, english_documents):
    # Four paragraphs per document, documents separated by blank lines (BERT's text format).
    documents = ["\n".join(english_documents[i : i + 4]) for i in range(0, 400, 4)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(documents))
    return str(path)


def run_main(monkeypatch, *arguments):
    monkeypatch.setattr(sys, "argv", ["prepare_dataset.py", *arguments])
    return prepare_dataset.main()


def test_text_to_spec_dataset(monkeypatch, tmp_path, tokenizer_dir, tokenizer, corpus_file):
    output = tmp_path / "out"
    common = ["--tokenizer_name", tokenizer_dir, "--train_file", corpus_file, "--max_seq_length", "64",
              "--output_dir", str(output), "--cache_dir", str(tmp_path / "cache")]
    summary = run_main(monkeypatch, *common, "--num_workers", "2", "--validation_split_percentage", "10")

    assert not os.path.exists(str(output) + ".partial")
    loaded = datasets.load_from_disk(str(output))
    assert set(loaded) == {"train", "validation"}
    assert summary["documents"] == {"train": 90, "validation": 10}
    for split in loaded.values():
        assert split.column_names == PRETRAINING_COLUMNS
        ids, labels = np.array(split["input_ids"]), np.array(split["labels"])
        assert ids.shape[1] == labels.shape[1] == 64
        assert np.array(split["attention_mask"]).shape[1] == np.array(split["token_type_ids"]).shape[1] == 64
        assert (ids[:, 0] == tokenizer.cls_token_id).all()
        masked = labels != -100
        assert masked.any()
        # input_ids stay the unmasked originals: the labels at masked positions are those very ids.
        assert (labels[masked] == ids[masked]).all()
        assert set(split["next_sentence_label"]) == {0, 1}
    assert summary["splits"]["train"]["pairs"] == len(loaded["train"])

    # Refused without --overwrite; the existing output is untouched.
    with pytest.raises(ValueError, match="exists and is not empty: pass --overwrite"):
        run_main(monkeypatch, *common)
    assert datasets.load_from_disk(str(output))["train"]["input_ids"] == loaded["train"]["input_ids"]

    # --overwrite with --static_masking: same seed, same pairs and labels, masked input_ids.
    run_main(monkeypatch, *common, "--validation_split_percentage", "10", "--overwrite", "--static_masking")
    static = datasets.load_from_disk(str(output))
    assert static["train"]["labels"] == loaded["train"]["labels"]
    static_ids = np.array(static["train"]["input_ids"])
    original_ids = np.array(loaded["train"]["input_ids"])
    masked = np.array(loaded["train"]["labels"]) != -100
    assert (static_ids[~masked] == original_ids[~masked]).all()
    assert (static_ids[masked] == tokenizer.mask_token_id).mean() > 0.7
    assert not os.path.exists(str(output) + ".partial")


def test_validation_file_is_one_pass_and_dupe_factor_multiplies_training(monkeypatch, tmp_path, tokenizer_dir, corpus_file):
    # The validation split comes from its own documents, built once; --dupe_factor passes over the training
    # documents with pairs drawn afresh each pass.
    common = ["--tokenizer_name", tokenizer_dir, "--max_seq_length", "64", "--cache_dir", str(tmp_path / "cache")]
    once = run_main(monkeypatch, *common, "--train_file", corpus_file, "--output_dir", str(tmp_path / "once"))
    validation = tmp_path / "validation.txt"
    validation.write_text("\n\n".join(open(corpus_file).read().split("\n\n")[:10]))
    summary = run_main(monkeypatch, *common, "--train_file", corpus_file, "--validation_file", str(validation),
                       "--dupe_factor", "3", "--output_dir", str(tmp_path / "thrice"))
    loaded = datasets.load_from_disk(str(tmp_path / "thrice"))
    assert summary["documents"] == {"train": 100, "validation": 10}
    assert len(loaded["train"]) > 2.5 * once["splits"]["train"]["pairs"]
    assert len(set(map(tuple, loaded["train"]["input_ids"]))) > 2 * once["splits"]["train"]["pairs"]
    alone = run_main(monkeypatch, *common, "--train_file", str(validation), "--output_dir", str(tmp_path / "alone"))
    assert len(loaded["validation"]) == alone["splits"]["train"]["pairs"]


def test_stale_partial_folder_is_replaced(monkeypatch, tmp_path, tokenizer_dir, corpus_file):
    # A folder an interrupted run left: marked as prepare_dataset.py's own. (Unmarked ones are refused: see
    # tests/test_bad_input.py.)
    output = tmp_path / "out"
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / prepare_dataset.PARTIAL_MARKER).write_text("")
    (partial / "junk").write_text("left by a killed run")
    run_main(monkeypatch, "--tokenizer_name", tokenizer_dir, "--train_file", corpus_file,
             "--max_seq_length", "32", "--output_dir", str(output), "--cache_dir", str(tmp_path / "cache"))
    assert not partial.exists()
    assert list(datasets.load_from_disk(str(output))) == ["train"]


def test_tfrecord_shards_convert_to_spec(monkeypatch, tmp_path):
    tfrecord_writer = pytest.importorskip("tfrecord.writer")
    path = str(tmp_path / "shard.tfrecord")
    writer = tfrecord_writer.TFRecordWriter(path)
    # Google/Graphcore layout: input_ids already masked (103 = [MASK]), originals in masked_lm_ids at
    # masked_lm_positions, padded with position 0 / id 0 / weight 0.
    examples = [
        ([101, 7, 103, 9, 102, 11, 103, 102, 0, 0], [1] * 8 + [0, 0], [0] * 5 + [1] * 3 + [0, 0],
         [2, 6, 0], [8, 12, 0], [1.0, 1.0, 0.0], 0),
        ([101, 21, 22, 102, 103, 24, 102, 0, 0, 0], [1] * 7 + [0] * 3, [0] * 4 + [1] * 3 + [0] * 3,
         [4, 0, 0], [23, 0, 0], [1.0, 0.0, 0.0], 1),
    ]
    for ids, mask, segments, positions, lm_ids, weights, nsp in examples:
        writer.write({
            "input_ids": (ids, "int"), "input_mask": (mask, "int"), "segment_ids": (segments, "int"),
            "masked_lm_positions": (positions, "int"), "masked_lm_ids": (lm_ids, "int"),
            "masked_lm_weights": (weights, "float"), "next_sentence_labels": ([nsp], "int"),
        })
    writer.close()

    output = tmp_path / "out"
    run_main(monkeypatch, "--tfrecord_files", path, "--output_dir", str(output), "--cache_dir", str(tmp_path / "c"))
    train = datasets.load_from_disk(str(output))["train"]
    assert train.column_names == PRETRAINING_COLUMNS
    first, second = train[0], train[1]
    assert first["input_ids"] == [101, 7, 8, 9, 102, 11, 12, 102, 0, 0]  # originals restored
    assert first["labels"] == [-100, -100, 8, -100, -100, -100, 12, -100, -100, -100]
    assert first["attention_mask"] == examples[0][1] and first["token_type_ids"] == examples[0][2]
    assert (first["next_sentence_label"], second["next_sentence_label"]) == (0, 1)
    assert second["labels"] == [-100] * 4 + [23] + [-100] * 5

    run_main(monkeypatch, "--tfrecord_files", path, "--output_dir", str(output), "--overwrite", "--static_masking",
             "--cache_dir", str(tmp_path / "c"))
    assert datasets.load_from_disk(str(output))["train"][0]["input_ids"] == examples[0][0]  # kept as stored


def test_the_summary_reads_a_bounded_block_of_rows_at_a_time(monkeypatch):
    """The summary of a corpus of any size costs one block of memory: no read of more than SUMMARY_ROWS rows, and
    the same numbers as computed from the whole columns."""
    monkeypatch.setattr(prepare_dataset, "SUMMARY_ROWS", 64)
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 17, size=250)
    mask = (np.arange(16) < lengths[:, None]).astype(np.int32)
    labels = np.where(rng.random((250, 16)) < 0.15, 7, -100)
    nsp = rng.integers(0, 2, size=250)
    dataset = datasets.Dataset.from_dict({"attention_mask": mask, "labels": labels, "next_sentence_label": nsp})
    slices = []
    read = datasets.Dataset.__getitem__

    def recording(self, key):
        if isinstance(key, slice):
            slices.append(len(range(*key.indices(len(self)))))
        return read(self, key)

    monkeypatch.setattr(datasets.Dataset, "__getitem__", recording)
    summary = prepare_dataset.summarize(dataset)
    assert slices and max(slices) <= 64
    assert summary == pytest.approx({"pairs": 250, "random_next_fraction": nsp.mean(),
                                     "padding_fraction": 1 - mask.mean(), "masked_tokens_per_sequence": (labels != -100).sum() / 250})


def test_output_is_sharded(monkeypatch, tmp_path, tokenizer_dir, english_documents):
    output = tmp_path / "out"
    run_main(monkeypatch, "--tokenizer_name", tokenizer_dir, "--train_file", small_corpus(tmp_path, english_documents),
             "--max_seq_length", "32", "--output_dir", str(output), "--num_shards", "3")
    assert sorted(name for name in os.listdir(output / "train") if name.startswith("data-")) == [
        f"data-0000{i}-of-00003.arrow" for i in range(3)]
    run_main(monkeypatch, "--tokenizer_name", tokenizer_dir, "--train_file", small_corpus(tmp_path, english_documents),
             "--max_seq_length", "32", "--output_dir", str(tmp_path / "by-size"), "--max_shard_size", "20KB")
    by_size = [name for name in os.listdir(tmp_path / "by-size" / "train") if name.startswith("data-")]
    assert len(by_size) > 3
    assert (datasets.load_from_disk(str(tmp_path / "by-size"))["train"]["input_ids"]
            == datasets.load_from_disk(str(output))["train"]["input_ids"])


def test_bench_smoke(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["preprocess.py", "--megabytes", "0.2", "--max_seq_length", "64"])
    runpy.run_path(os.path.join(REPO, "bench", "preprocess.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("speedup: ") and lines[-1].endswith("x")
    assert float(lines[-1].split()[1][:-1]) > 0


def test_scale_bench_helpers(tmp_path):
    """bench/scale.py's parts that do not need minutes: its corpus is the same bytes every time, its large dataset is
    a dataset of that many rows, and its memory sampler sees a child's allocation."""
    scale = runpy.run_path(os.path.join(REPO, "bench", "scale.py"))
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    assert scale["write_corpus"](str(first), 0.05) >= 0.05
    scale["write_corpus"](str(second), 0.05)
    assert first.read_bytes() == second.read_bytes() and b"\n\n" in first.read_bytes()
    scale["synthetic_rows"](str(tmp_path / "small"), 30, seq_len=16)
    scale["linked_copies"](str(tmp_path / "small"), str(tmp_path / "large"), 4)
    large = datasets.load_from_disk(str(tmp_path / "large"))
    assert len(large) == 120 and large[95] == datasets.load_from_disk(str(tmp_path / "small"))[5]
    measured = scale["run_measured"]([sys.executable, "-c", "import time; b = bytearray(200 << 20); time.sleep(0.5)"],
                                     dict(os.environ))
    assert measured["returncode"] == 0 and measured["anon_mb"] > 150


def test_dataset_name_with_text_column(monkeypatch, tmp_path, tokenizer_dir, english_documents):
    # A local folder stands in for a hub dataset (same load_dataset call, no network).
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = ["\n".join(english_documents[i : i + 3]) for i in range(0, 120, 3)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"id": i, "body": body}) for i, body in enumerate(rows)))
    output = tmp_path / "out"
    base = ["--tokenizer_name", tokenizer_dir, "--dataset_name", str(folder), "--max_seq_length", "64",
            "--output_dir", str(output), "--cache_dir", str(tmp_path / "cache")]
    with pytest.raises(ValueError, match="--text_column='text' is not a column"):
        run_main(monkeypatch, *base)
    summary = run_main(monkeypatch, *base, "--text_column", "body")
    assert summary["documents"] == {"train": 40}
    assert datasets.load_from_disk(str(output))["train"].column_names == PRETRAINING_COLUMNS


# ---- the work folder and the datasets cache -------------------------------------------------------------------


def small_corpus(tmp_path, english_documents, documents=30):
    path = tmp_path / "small.txt"
    path.write_text("\n\n".join("\n".join(english_documents[i : i + 4]) for i in range(0, 4 * documents, 4)))
    return str(path)


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names)


def test_nothing_is_left_in_the_global_datasets_cache_or_in_the_output(tmp_path, tokenizer_dir, english_documents):
    """Without --cache_dir the run's datasets cache lives in OUTPUT.partial and goes with it: the global cache (here
    HF_HOME and HF_DATASETS_CACHE in a test folder) stays empty and the output holds only the dataset."""
    home = tmp_path / "hf-home"
    output = tmp_path / "out"
    environment = dict(os.environ, HF_HOME=str(home), HF_DATASETS_CACHE=str(home / "datasets"), HF_HUB_OFFLINE="1",
                       PYTHONPATH=REPO)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "prepare_dataset.py"), "--tokenizer_name", tokenizer_dir, "--train_file",
         small_corpus(tmp_path, english_documents), "--max_seq_length", "64", "--validation_split_percentage", "10",
         "--output_dir", str(output)],
        env=environment, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_under(home) == []
    assert not os.path.exists(str(output) + ".partial")
    assert sorted(os.listdir(output)) == ["dataset_dict.json", "prepare_dataset.json", "train", "validation"]
    for split in ("train", "validation"):
        assert {name for name in os.listdir(output / split) if not name.startswith("data-")} == {
            "dataset_info.json", "state.json"}
    assert len(datasets.load_from_disk(str(output))["validation"]) > 0


def test_a_failed_run_leaves_no_work_folder(monkeypatch, tmp_path, tokenizer_dir):
    one_sentence = tmp_path / "one.txt"
    one_sentence.write_text("Only one sentence here.\n")
    output = tmp_path / "out"
    with pytest.raises(ValueError, match="No sentence pairs could be built"):
        run_main(monkeypatch, "--tokenizer_name", tokenizer_dir, "--train_file", str(one_sentence), "--max_seq_length",
                 "32", "--output_dir", str(output))
    assert sorted(os.listdir(tmp_path)) == ["one.txt"]


def test_an_interrupted_run_leaves_its_cache_for_the_next_run_which_removes_it(monkeypatch, tmp_path, tokenizer_dir,
                                                                               english_documents, caplog):
    output = tmp_path / "out"
    partial = tmp_path / "out.partial"
    arguments = ["--tokenizer_name", tokenizer_dir, "--train_file", small_corpus(tmp_path, english_documents),
                 "--max_seq_length", "32", "--output_dir", str(output)]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(prepare_dataset, "add_mlm_labels", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_main(patch, *arguments)
    cached = files_under(partial / prepare_dataset.WORK_CACHE)
    assert any(name.endswith(".arrow") for name in cached)  # the documents and pairs built before the interruption
    with caplog.at_level("INFO", logger="prepare_dataset"):
        run_main(monkeypatch, *arguments)
    assert "Reusing the datasets cache an interrupted run left" in caplog.text
    assert not partial.exists() and datasets.load_from_disk(str(output))["train"].column_names == PRETRAINING_COLUMNS


def test_a_work_folder_another_live_run_is_writing_is_refused(monkeypatch, tmp_path, tokenizer_dir, english_documents):
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / prepare_dataset.PARTIAL_MARKER).write_text("")
    # The lock of a process that runs on this machine: the one that started these tests.
    (partial / "run.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "now"}))
    (partial / "its-work").write_text("being written")
    with pytest.raises(ValueError, match=r"out\.partial is in use by another run"):
        run_main(monkeypatch, "--tokenizer_name", tokenizer_dir, "--train_file", small_corpus(tmp_path, english_documents),
                 "--max_seq_length", "32", "--output_dir", str(tmp_path / "out"))
    assert (partial / "its-work").read_text() == "being written"
