"""cli.script_args: the flags the three scripts share, parsed and checked before anything is loaded."""

import json
from types import SimpleNamespace

import pytest
from conftest import script_module

from ipu_trainer.cli.script_args import DataArguments, PackingArguments, check_streaming_args, parse_script_args


@pytest.mark.parametrize("script", ["run_pretraining", "run_mlm", "run_clm"])
def test_token_trust_remote_code_and_dtype_flags_parse_in_every_script(script, monkeypatch):
    module = script_module(script)
    monkeypatch.setattr("sys.argv", [f"{script}.py", "--token", "hf_secret", "--trust_remote_code", "--dtype",
                                     "bfloat16", "--dataset_name", "x", "--output_dir", "o"])
    model_args, _, _ = parse_script_args(module.ModelArguments, module.DataTrainingArguments)
    assert (model_args.token, model_args.trust_remote_code, model_args.dtype) == ("hf_secret", True, "bfloat16")
    monkeypatch.setattr("sys.argv", [f"{script}.py", "--torch_dtype", "float16", "--dtype", "bfloat16",
                                     "--dataset_name", "x", "--output_dir", "o"])
    with pytest.raises(ValueError, match="--torch_dtype float16 and --dtype bfloat16 disagree"):
        parse_script_args(module.ModelArguments, module.DataTrainingArguments)


# ---- --streaming: what it needs from the other flags, before anything is loaded ---------------------------------


def streaming_data_args(**values):
    flags = dict(streaming=True, train_file="train.txt", validation_file=None, max_eval_samples=None)
    return SimpleNamespace(**{**flags, **values})


def test_streaming_needs_max_steps_to_train_and_a_hold_out_size_to_evaluate_local_files_without_validation():
    training = SimpleNamespace(do_train=True, do_eval=False, max_steps=-1)
    with pytest.raises(ValueError, match="--streaming with --do_train needs --max_steps N"):
        check_streaming_args(streaming_data_args(), training)
    check_streaming_args(streaming_data_args(streaming=False), training)  # epochs work without a stream
    evaluating = SimpleNamespace(do_train=True, do_eval=True, max_steps=5)
    with pytest.raises(ValueError, match="--streaming with --do_eval and no validation data .* needs --max_eval_samples N"):
        check_streaming_args(streaming_data_args(), evaluating)
    check_streaming_args(streaming_data_args(max_eval_samples=16), evaluating)
    check_streaming_args(streaming_data_args(validation_file="validation.txt"), evaluating)
    # A hub dataset's splits are known once it is opened; train_and_eval_splits applies the same rule then.
    check_streaming_args(streaming_data_args(train_file=None, dataset_name="wikitext"), evaluating)


# ---- the shared data flags, checked before anything is loaded -------------------------------------------------


def test_the_data_flags_need_one_source_that_exists_and_numbers_in_range(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("a line\n")
    assert DataArguments(train_file=str(train)).train_file == str(train)
    with pytest.raises(ValueError, match="Need data: --dataset_name, or --train_file"):
        DataArguments()
    with pytest.raises(ValueError, match="--train_file would be ignored with --dataset_name"):
        DataArguments(dataset_name="wikitext", train_file=str(train))
    with pytest.raises(FileNotFoundError, match="--train_file .*missing.txt: no such file"):
        DataArguments(train_file=str(tmp_path / "missing.txt"))
    for values, message in [(dict(max_train_samples=0), "--max_train_samples=0 is invalid"),
                            (dict(validation_split_percentage=100), "--validation_split_percentage=100 is invalid")]:
        with pytest.raises(ValueError, match=message):
            DataArguments(train_file=str(train), **values)


def test_packing_cannot_stream_and_counts_sequences_from_one(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Packed(PackingArguments, DataArguments):
        pass

    train = tmp_path / "train.txt"
    train.write_text("a line\n")
    with pytest.raises(ValueError, match="--packing chooses which sequences share a row"):
        Packed(train_file=str(train), packing=True, streaming=True)
    with pytest.raises(ValueError, match="--max_sequences_per_row=0 is invalid"):
        Packed(train_file=str(train), max_sequences_per_row=0)
    with pytest.raises(ValueError, match="Need data"):  # the data checks still run
        Packed(packing=True)


def test_the_arguments_can_come_from_a_json_file(tmp_path, monkeypatch):
    module = script_module("run_mlm")
    arguments = tmp_path / "args.json"
    arguments.write_text(json.dumps({"dataset_name": "wikitext", "output_dir": str(tmp_path / "out"),
                                     "max_seq_length": 64, "learning_rate": 0.001, "report_to": "none"}))
    monkeypatch.setattr("sys.argv", ["run_mlm.py", str(arguments)])
    model_args, data_args, training_args = parse_script_args(module.ModelArguments, module.DataTrainingArguments)
    assert (data_args.dataset_name, data_args.max_seq_length, training_args.learning_rate) == ("wikitext", 64, 0.001)
    assert model_args.model_name_or_path is None
