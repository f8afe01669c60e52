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
    ({}, {"ACCELERATE_USE_FSDP": "true"}, "ACCELERATE_USE_FSDP"),  # --fsdp itself is supported (tests/test_fsdp.py)
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


# ---- departures from the original's math, and refused combinations ---------------------------------------------


def test_the_defaults_are_the_originals_math_and_each_departure_is_named(tmp_path):
    assert make_args(tmp_path).departures_from_original() == []
    assert make_args(tmp_path, lamb=True).departures_from_original() == []  # LAMB at the original's betas
    departures = make_args(tmp_path, optim="adamw_torch", max_grad_norm=1.0,
                           dataloader_drop_last=False).departures_from_original()
    assert [line.split(" (")[0] for line in departures] == [
        "--optim adamw_torch", "--max_grad_norm 1.0", "--dataloader_drop_last False"]
    [betas] = make_args(tmp_path, lamb_no_bias_correction=True, adam_beta2=0.98).departures_from_original()
    assert betas.startswith("LAMB with betas (0.9, 0.98) from --adam_beta1/--adam_beta2")


def test_the_optimizer_flags(tmp_path):
    args = make_args(tmp_path)
    assert args.optim == "poptorch" and args.uses_original_optimizer and not args.uses_lamb
    assert make_args(tmp_path, lamb_no_bias_correction=True).uses_lamb
    assert not make_args(tmp_path, optim="sgd").uses_original_optimizer
    with pytest.raises(ValueError, match="--lamb and --optim sgd both choose the optimizer"):
        make_args(tmp_path, lamb=True, optim="sgd")


@pytest.mark.parametrize("values, message", [
    (dict(warmup_ratio=0.1, warmup_steps=5), "--warmup_ratio and --warmup_steps both set the warmup"),
    (dict(warmup_ratio=1.0), r"--warmup_ratio=1.0 is invalid: must be in \[0, 1\)"),
    (dict(fp32=True, bf16=True), "--fp32 and --bf16 contradict each other"),
    (dict(pod_type="pod16", n_ipu=8), "--pod_type pod16 means --n_ipu 16, which contradicts --n_ipu 8"),
    (dict(loss_scaling=0.0), "--loss_scaling=0.0 is invalid"),
    (dict(gradient_accumulation_steps=0), "--gradient_accumulation_steps=0 is invalid"),
    (dict(do_train=True, num_train_epochs=0), "--num_train_epochs 0 with --max_steps -1 trains nothing"),
    (dict(max_grad_norm=-1.0), "--max_grad_norm=-1.0 is invalid"),
    (dict(report_to=["no-such-integration"]), "--report_to no-such-integration is not a known integration"),
])
def test_contradicting_or_out_of_range_flags_are_refused(tmp_path, values, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **values)


def test_the_original_flags_take_their_current_form(tmp_path):
    args = make_args(tmp_path, pod_type="pod16", evaluation_strategy="steps", group_by_length=True,
                     push_to_hub_model_id="m", push_to_hub_organization="org")
    assert (args.n_ipu, args.eval_strategy, args.train_sampling_strategy) == (16, "steps", "group_by_length")
    assert (args.hub_model_id, args.push_to_hub_model_id, args.group_by_length) == ("org/m", None, False)


def test_warmup_is_a_count_a_fraction_or_the_ratio_rounded_up(tmp_path):
    assert warmup_steps_for(10, warmup_ratio=0.25) == 3  # ceil(2.5)
    assert warmup_steps_for(10, warmup_steps=0.25) == 3  # a fraction in --warmup_steps is a ratio
    assert warmup_steps_for(10, warmup_ratio=0.5, warmup_steps=4) == 4
    assert warmup_steps_for(10) == 0
    with pytest.raises(ValueError, match="warmup_steps=-1 is invalid"):
        warmup_steps_for(10, warmup_steps=-1)
    assert make_args(tmp_path, warmup_ratio=0.28).get_warmup_steps(10500) == 2941
    assert make_args(tmp_path, warmup_steps=7).get_warmup_steps(10500) == 7
