"""cli.datasets: where the data comes from, the one sequence-length rule, the text column, blocks, and the train
and evaluation splits (a stream's held-out evaluation rows included)."""

import itertools
import logging
from types import SimpleNamespace

import pytest
from datasets import Dataset, DatasetDict, IterableDatasetDict

from ipu_trainer.cli import hub
from ipu_trainer.cli.datasets import (
    data_files_of,
    data_source_of,
    eval_held_out_of_train,
    group_texts,
    load_hub_dataset,
    load_raw_datasets,
    pad_lines_to_max_length,
    require_columns,
    require_full_step,
    require_samples,
    resolve_sequence_length,
    split_source,
    text_and_other_columns,
    text_blocks,
    text_column_of,
    train_and_eval_splits,
)


def data_args(**values):
    """The data flags train_and_eval_splits and load_raw_datasets read, at the scripts' defaults, with `values`."""
    defaults = dict(dataset_name=None, dataset_config_name=None, dataset_path=None, train_file=None,
                    validation_file=None, validation_split_percentage=0, max_train_samples=None, max_eval_samples=None,
                    streaming=False)
    return SimpleNamespace(**{**defaults, **values})


def steps(do_train=True, do_eval=True):
    return SimpleNamespace(do_train=do_train, do_eval=do_eval)


def numbered_rows(count):
    return [{"input_ids": [i, i]} for i in range(count)]


def test_block_size_defaults_and_limits():
    from ipu_trainer.cli.datasets import resolve_sequence_length

    tokenizer = SimpleNamespace(model_max_length=int(1e30))
    assert resolve_sequence_length("--block_size", None, tokenizer) == 1024
    assert resolve_sequence_length("--block_size", None, tokenizer, model_max_positions=256) == 256
    assert resolve_sequence_length("--block_size", None, SimpleNamespace(model_max_length=512), 1024) == 512
    assert resolve_sequence_length("--block_size", 2048, SimpleNamespace(model_max_length=512), 4096) == 512  # clipped to the tokenizer
    with pytest.raises(ValueError, match="--block_size 2048 is larger than the model's 1024 positions"):
        resolve_sequence_length("--block_size", 2048, tokenizer, 1024)
    with pytest.raises(ValueError, match="--block_size=0"):
        resolve_sequence_length("--block_size", 0, tokenizer, 1024)


def test_max_seq_length_follows_the_same_rule_as_block_size():
    from ipu_trainer.cli.datasets import resolve_sequence_length

    assert resolve_sequence_length("--max_seq_length", None, SimpleNamespace(model_max_length=512), 128) == 128
    with pytest.raises(ValueError, match="--max_seq_length 256 is larger than the model's 128 positions"):
        resolve_sequence_length("--max_seq_length", 256, SimpleNamespace(model_max_length=512), 128)



@pytest.mark.parametrize("source", ["--dataset_name", "--dataset_path", "--train_file"])
def test_every_data_source_is_read_as_a_stream_of_the_same_rows(source, tmp_path):
    """A hub dataset (a local folder of data files goes through the same loader), a save_to_disk folder and local
    files: streams of the rows the same source gives without --streaming, the splits kept."""
    from datasets import Dataset, DatasetDict

    from ipu_trainer.cli.datasets import load_raw_datasets, text_column_of
    from ipu_trainer.data.sources import is_stream

    rows = {"train": [{"text": f"train line {i}", "id": i} for i in range(30)],
            "validation": [{"text": f"validation line {i}", "id": i} for i in range(5)]}
    folder = tmp_path / "data"
    folder.mkdir()
    for split, split_rows in rows.items():
        Dataset.from_list(split_rows).to_json(str(folder / f"{split}.json"))
    values = {"--dataset_name": str(folder), "--dataset_path": str(tmp_path / "saved"),
              "--train_file": str(folder / "train.json")}
    DatasetDict({split: Dataset.from_list(split_rows) for split, split_rows in rows.items()}).save_to_disk(values["--dataset_path"])

    def data_args(streaming):
        arguments = dict(dataset_name=None, dataset_config_name=None, dataset_path=None, train_file=None,
                         validation_file=None, validation_split_percentage=0, streaming=streaming)
        arguments[source[2:]] = values[source]
        if source == "--train_file":
            arguments["validation_file"] = str(folder / "validation.json")
        return type("DataArguments", (), arguments)()

    model_args = type("ModelArguments", (), {"cache_dir": str(tmp_path / "cache")})()
    streamed = load_raw_datasets(data_args(True), model_args)
    loaded = load_raw_datasets(data_args(False), model_args)
    assert is_stream(streamed) and not is_stream(loaded)
    assert sorted(streamed) == sorted(loaded) == ["train", "validation"]
    for split in loaded:
        assert list(streamed[split]) == loaded[split].to_list() == rows[split]
        assert text_column_of(streamed[split]) == "text"


# ---- local files and where the data comes from ---------------------------------------------------------------


def test_data_files_must_exist_be_readable_types_and_agree(tmp_path):
    for name in ("a.txt", "b.txt", "c.json", "d.xml"):
        (tmp_path / name).write_text("x\n")
    assert data_files_of(data_args(train_file=str(tmp_path / "a.txt"), validation_file=str(tmp_path / "b.txt"))) == {
        "train": str(tmp_path / "a.txt"), "validation": str(tmp_path / "b.txt")}
    assert data_files_of(data_args()) == {}
    with pytest.raises(FileNotFoundError, match="--validation_file .*missing.txt: no such file"):
        data_files_of(data_args(validation_file=str(tmp_path / "missing.txt")))
    with pytest.raises(ValueError, match=r"--train_file .*d.xml: unsupported file type '.xml'"):
        data_files_of(data_args(train_file=str(tmp_path / "d.xml")))
    with pytest.raises(ValueError, match=r"must be of the same type, got \['json', 'text'\]"):
        data_files_of(data_args(train_file=str(tmp_path / "a.txt"), validation_file=str(tmp_path / "c.json")))


def test_messages_name_the_flag_the_data_came_from():
    assert data_source_of(data_args(dataset_name="wikitext", train_file="t.txt")) == "--dataset_name wikitext"
    assert data_source_of(data_args(dataset_path="saved")) == "--dataset_path saved"
    assert data_source_of(data_args()) == "the data"
    both = data_args(train_file="t.txt", validation_file="v.txt")
    assert (split_source(both, "train"), split_source(both, "validation")) == ("--train_file t.txt", "--validation_file v.txt")
    assert split_source(data_args(dataset_name="wikitext"), "validation") == "--dataset_name wikitext"


def test_the_validation_split_is_the_first_rows_of_train(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {i}\n" for i in range(30)))
    raw = load_raw_datasets(data_args(train_file=str(path), validation_split_percentage=10),
                            SimpleNamespace(cache_dir=str(tmp_path / "cache")))
    assert raw["validation"]["text"] == ["line 0", "line 1", "line 2"]  # 10% of 30, from the start
    assert raw["train"]["text"] == [f"line {i}" for i in range(3, 30)]
    unsplit = load_raw_datasets(data_args(train_file=str(path), validation_split_percentage=0),
                                SimpleNamespace(cache_dir=str(tmp_path / "cache")))
    assert list(unsplit) == ["train"] and len(unsplit["train"]) == 30


def test_a_dataset_name_that_is_neither_a_folder_nor_cached_is_one_line_offline(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match="--dataset_name /no/such/folder: no such folder, and not a hub dataset"):
        load_hub_dataset("--dataset_name", "/no/such/folder")
    with pytest.raises(hub.HubError, match=r"--dataset_name someone/not-cached: .*HF_HUB_OFFLINE=1 is set"):
        load_hub_dataset("--dataset_name", "someone/not-cached", cache_dir=str(tmp_path / "cache"))


# ---- sequence length, text column, blocks -------------------------------------------------------------------


def test_the_default_length_is_capped_and_a_long_request_clipped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="ipu_trainer"):
        assert resolve_sequence_length("--max_seq_length", None, SimpleNamespace(model_max_length=int(1e30)), 512) == 512
        assert resolve_sequence_length("--max_seq_length", 300, SimpleNamespace(model_max_length=256), 512) == 256
    messages = [record.getMessage() for record in caplog.records]
    assert any("using --max_seq_length 512. Set --max_seq_length to change it" in m for m in messages)
    assert any("--max_seq_length 300 is longer than the tokenizer maximum (256); using 256" in m for m in messages)
    assert resolve_sequence_length("--max_seq_length", 64, SimpleNamespace(model_max_length=256), None) == 64


def test_line_by_line_samples_are_padded_when_asked_or_streamed_to_several_processes():
    def pads(world_size=1, **values):
        flags = dict(pad_to_max_length=False, line_by_line=True, streaming=False)
        return pad_lines_to_max_length(SimpleNamespace(**{**flags, **values}), world_size)

    assert pads(pad_to_max_length=True) and not pads()
    assert pads(streaming=True, world_size=2) and not pads(streaming=True, world_size=1)
    assert not pads(streaming=True, world_size=2, line_by_line=False)  # blocks all have one length already


def test_the_text_column_is_text_else_the_first_and_must_hold_strings():
    assert text_column_of(Dataset.from_dict({"id": [1], "text": ["a"]})) == "text"
    assert text_column_of(Dataset.from_dict({"body": ["a"], "id": [1]})) == "body"
    with pytest.raises(ValueError, match="--train_file x.csv has no 'text' column, and its first column 'id' holds int64"):
        text_column_of(Dataset.from_dict({"id": [1], "body": ["a"]}), "--train_file x.csv")
    with pytest.raises(ValueError, match="has no rows: nothing to train on"):
        text_column_of(Dataset.from_dict({}))
    raw = DatasetDict({"validation": Dataset.from_dict({"body": ["a"], "id": [1]}),
                       "train": Dataset.from_dict({"body": ["b"], "id": [2]})})
    assert text_and_other_columns(raw) == ("body", ["body", "id"])


def test_group_texts_concatenates_every_column_and_drops_the_remainder():
    examples = {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]], "attention_mask": [[1, 1, 1], [1, 1], [1, 1, 1, 0]]}
    assert group_texts(examples, 4) == {"input_ids": [[1, 2, 3, 4], [5, 6, 7, 8]],
                                        "attention_mask": [[1, 1, 1, 1], [1, 1, 1, 1]]}
    assert group_texts(examples, 10) == {"input_ids": [], "attention_mask": []}


def test_text_blocks_cut_the_tokenized_texts_and_label_them_for_a_causal_lm(tokenizer):
    raw = DatasetDict({"train": Dataset.from_dict({"text": ["one two three four five", "six seven eight"], "n": [1, 2]})})
    ids = [i for text in raw["train"]["text"] for i in tokenizer(text)["input_ids"]]
    blocks = text_blocks(raw, tokenizer, 4, with_labels=True)["train"]
    assert blocks["input_ids"] == [ids[i : i + 4] for i in range(0, len(ids) // 4 * 4, 4)]
    assert blocks["labels"] == blocks["input_ids"] and "n" not in blocks.column_names


# ---- checks of what was loaded -------------------------------------------------------------------------------


def test_missing_columns_and_empty_splits_are_refused_with_the_source():
    pairs = Dataset.from_dict({"input_ids": [[1]], "labels": [[1]]})
    with pytest.raises(ValueError, match=r"--dataset_path p has no 'next_sentence_label', 'token_type_ids' columns .*Build"):
        require_columns(pairs, ["input_ids", "next_sentence_label", "token_type_ids"], "Build them.", "--dataset_path p")
    require_columns(pairs, ["input_ids"], "unused")
    with pytest.raises(ValueError, match=r"^the train data \(--train_file t.txt\) yields no samples: too short$"):
        require_samples(Dataset.from_dict({"input_ids": []}), "train", "too short", "--train_file t.txt")


def test_training_data_smaller_than_one_step_is_refused():
    placement = SimpleNamespace(samples_per_step=8, micro_batch_size=2, gradient_accumulation_steps=2,
                                replication_factor=2, device_iterations=1)
    require_full_step(8, placement)
    with pytest.raises(ValueError, match=r"has 6 samples \(cut to --max_train_samples 6\) but one step takes 8 \(micro 2 x "
                                         r"accumulation 2 x replicas 2 x device iterations 1\)"):
        require_full_step(6, placement, max_train_samples=6)


# ---- the train and evaluation splits, and the streaming hold-out rule ----------------------------------------


def test_the_splits_are_cut_to_the_max_samples_and_checked():
    splits = DatasetDict({"train": Dataset.from_list(numbered_rows(10)), "validation": Dataset.from_list(numbered_rows(4))})
    train, evaluation = train_and_eval_splits(splits, steps(), data_args(max_train_samples=6, max_eval_samples=2), "empty")
    assert (train["input_ids"], evaluation["input_ids"]) == ([[i, i] for i in range(6)], [[0, 0], [1, 1]])
    assert train_and_eval_splits(splits, steps(do_eval=False), data_args(), "empty")[1] is None
    with pytest.raises(ValueError, match="--do_eval requires a validation split"):
        train_and_eval_splits(DatasetDict({"train": splits["train"]}), steps(), data_args(), "empty")
    with pytest.raises(ValueError, match="--do_train requires a train split"):
        train_and_eval_splits(DatasetDict({"validation": splits["validation"]}), steps(), data_args(), "empty")
    run = SimpleNamespace(train_placement=SimpleNamespace(samples_per_step=8, micro_batch_size=8,
                                                          gradient_accumulation_steps=1, replication_factor=1,
                                                          device_iterations=1))
    with pytest.raises(ValueError, match="has 6 samples .* but one step takes 8"):
        train_and_eval_splits(splits, steps(), data_args(max_train_samples=6), "empty", run)


def test_the_hold_out_rule_evaluates_a_stream_without_validation_data_on_its_first_rows():
    streaming = data_args(streaming=True, max_eval_samples=4)
    assert eval_held_out_of_train(streaming, steps(), has_validation=False)
    assert eval_held_out_of_train(streaming, steps(do_train=False), has_validation=False)
    assert not eval_held_out_of_train(streaming, steps(), has_validation=True)
    assert not eval_held_out_of_train(streaming, steps(do_eval=False), has_validation=False)
    assert not eval_held_out_of_train(data_args(max_eval_samples=4), steps(), has_validation=False)
    with pytest.raises(ValueError, match="--streaming with --do_eval and no validation data .* needs --max_eval_samples N"):
        eval_held_out_of_train(data_args(streaming=True), steps(), has_validation=False)
    assert not eval_held_out_of_train(data_args(streaming=True), steps(), has_validation=True)


def test_a_stream_without_validation_data_holds_out_its_first_rows_and_trains_on_the_rest_again_and_again():
    stream = IterableDatasetDict({"train": Dataset.from_list(numbered_rows(10)).to_iterable_dataset()})
    train, evaluation = train_and_eval_splits(stream, steps(), data_args(streaming=True, max_eval_samples=3), "empty")
    assert evaluation["input_ids"] == [[0, 0], [1, 1], [2, 2]]
    assert [row["input_ids"][0] for row in itertools.islice(train, 10)] == [3, 4, 5, 6, 7, 8, 9, 3, 4, 5]
    with pytest.raises(ValueError, match="needs --max_eval_samples N"):
        train_and_eval_splits(stream, steps(), data_args(streaming=True), "empty")
    # With a validation split nothing is held out: training starts at the first row.
    stream["validation"] = Dataset.from_list(numbered_rows(2)).to_iterable_dataset()
    train, evaluation = train_and_eval_splits(stream, steps(), data_args(streaming=True), "empty")
    assert len(evaluation) == 2 and next(iter(train))["input_ids"] == [0, 0]

