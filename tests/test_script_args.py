"""cli.script_args: the flags the three scripts share, parsed and checked before anything is loaded."""

import pytest
from conftest import script_module

from ipu_trainer.cli.script_args import parse_script_args


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
