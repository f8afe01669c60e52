"""cli.datasets: where the data comes from, the one sequence-length rule, the text column, blocks, and the train
and evaluation splits (a stream's held-out evaluation rows included)."""

from types import SimpleNamespace

import pytest


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
