"""cli.script_args: the flags the three scripts share, parsed and checked before anything is loaded."""

from types import SimpleNamespace

import pytest
from conftest import script_module

from ipu_trainer.cli.script_args import check_streaming_args, parse_script_args


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
