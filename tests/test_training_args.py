"""run.training_args: IPUTrainingArguments (the original's defaults and flags, refused combinations, departures from
the original's math) and the warmup length."""

import pytest
from conftest import make_args

from ipu_trainer import IPUTrainingArguments
from ipu_trainer.run.training_args import warmup_steps_for


def test_the_masking_seed_is_data_seed_when_given(tmp_path):
    # run_mlm.py and run_pretraining.py seed their masking (and packing) with it.
    assert make_args(tmp_path, seed=3).masking_seed == 3
    assert make_args(tmp_path, seed=3, data_seed=11).masking_seed == 11


def test_the_original_batch_size_defaults_replace_transformers_eight(tmp_path):
    args = IPUTrainingArguments(output_dir=str(tmp_path), report_to=[])
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size) == (1, 1)
    assert args.gradient_accumulation_steps is None


@pytest.mark.parametrize("values, environment, flag", [
    (dict(deepspeed="ds_config.json"), {}, "--deepspeed"),
    ({}, {"ACCELERATE_USE_DEEPSPEED": "true"}, "--deepspeed"),
    (dict(fsdp="full_shard"), {}, "--fsdp"),
    ({}, {"ACCELERATE_USE_FSDP": "true"}, "--fsdp"),
    (dict(auto_find_batch_size=True), {}, "--auto_find_batch_size"),
])
def test_modes_that_would_change_the_batch_math_are_refused(tmp_path, monkeypatch, values, environment, flag):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"^{flag} is not supported"):
        make_args(tmp_path, **values)



def test_invalid_n_ipu_is_refused():
    with pytest.raises(ValueError, match="n_ipu=12"):
        IPUTrainingArguments(output_dir="unused", n_ipu=12)



def test_warmup_steps_for():
    assert warmup_steps_for(10500, 0.28) == 2941  # the original's math.ceil of 2940.0000000000005
    assert warmup_steps_for(2038, 0.128) == 261
    assert warmup_steps_for(100, 0.1, warmup_steps=7) == 7
    assert warmup_steps_for(100, 0.0) == 0
