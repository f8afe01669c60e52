"""The run is resolved once, in the original's precedence, before any weights or data exist."""

import dataclasses
import os
import sys
import time

import pytest
import torch
from conftest import make_args
from transformers import BertConfig, default_data_collator, get_scheduler

from ipu_trainer import IncompatibleIPUConfigError, IPUConfig, IPUTrainer, IPUTrainingArguments
from ipu_trainer.cli.startup import run_cli
from ipu_trainer.models import BertForPreTrainingMaskedPositions
from ipu_trainer.run.resolved_run import dataloader_workers, effective_ipu_config, resolve_run
from ipu_trainer.training.optimizers import get_groupbert_schedule
from tiny import masked_pairs, tiny_bert

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run_pretraining  # noqa: E402

SEED_IPU_CONFIG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def four_ipu_config(**values):
    return IPUConfig(layers_per_ipu=[0, 4, 4, 4], **values)


# ---- precedence: file, --n_ipu, --ipu_config_overrides, forwarded flags, seed -------------------------------


def test_an_explicit_replication_override_wins_over_n_ipu(tmp_path):
    assert effective_ipu_config(four_ipu_config(), make_args(tmp_path, n_ipu=16)).replication_factor == 4
    args = make_args(tmp_path, n_ipu=16, ipu_config_overrides="replication_factor=2")
    effective = effective_ipu_config(four_ipu_config(), args)
    assert effective.replication_factor == 2
    assert effective.inference_replication_factor == 4  # --n_ipu still set the inference twin


def test_a_command_line_accumulation_wins_over_an_override_of_the_same_field(tmp_path):
    args = make_args(tmp_path, gradient_accumulation_steps=8, ipu_config_overrides="gradient_accumulation_steps=16")
    assert effective_ipu_config(four_ipu_config(gradient_accumulation_steps=512), args).gradient_accumulation_steps == 8
    args = make_args(tmp_path, ipu_config_overrides="gradient_accumulation_steps=16")
    assert effective_ipu_config(four_ipu_config(gradient_accumulation_steps=512), args).gradient_accumulation_steps == 16
    assert effective_ipu_config(four_ipu_config(gradient_accumulation_steps=512), make_args(tmp_path)) \
        .gradient_accumulation_steps == 512


def test_gradient_checkpointing_wins_over_an_override_and_seed_is_taken_last(tmp_path):
    args = make_args(tmp_path, gradient_checkpointing=True, seed=7,
                     ipu_config_overrides="recompute_checkpoint_every_layer=false,seed=3")
    effective = effective_ipu_config(four_ipu_config(), args)
    assert effective.recompute_checkpoint_every_layer is True
    assert effective.seed == 7


def test_the_file_config_is_not_changed(tmp_path):
    config = four_ipu_config(gradient_accumulation_steps=512)
    effective_ipu_config(config, make_args(tmp_path, n_ipu=16, gradient_accumulation_steps=2))
    assert (config.replication_factor, config.gradient_accumulation_steps) == (1, 512)


# ---- the user's arguments keep their values -----------------------------------------------------------------


def test_training_args_record_the_users_accumulation_and_precision(tmp_path):
    args = make_args(tmp_path, fp32=False, bf16=True, gradient_accumulation_steps=4, max_steps=1,
                     per_device_train_batch_size=2, save_strategy="no")
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=IPUConfig(layers_per_ipu=[-1]), args=args,
                         data_collator=default_data_collator, train_dataset=masked_pairs(16))
    assert trainer.run.precision.mixed_precision == "bf16"
    trainer.train()
    trainer.save_model()
    for recorded in (args.to_dict(), torch.load(tmp_path / "out" / "training_args.bin", weights_only=False).to_dict()):
        assert recorded["gradient_accumulation_steps"] == 4 and recorded["bf16"] is True
        assert recorded["per_device_train_batch_size"] == 2
    # The loop ran one batch of 2 x 4 samples per step, without accumulation of its own.
    assert (trainer.args.gradient_accumulation_steps, trainer.args.per_device_train_batch_size) == (1, 8)


def test_replacing_the_arguments_keeps_the_accumulation(tmp_path):
    args = make_args(tmp_path, gradient_accumulation_steps=512)
    copy = dataclasses.replace(args, learning_rate=1e-3)
    assert copy.gradient_accumulation_steps == 512
    assert effective_ipu_config(four_ipu_config(), copy).gradient_accumulation_steps == 512


# ---- warmup: one computation for every schedule ------------------------------------------------------------


def lr_multipliers(scheduler, steps):
    return [scheduler.lr_lambdas[0](step) for step in steps]


@pytest.mark.parametrize("warmup, steps", [(dict(warmup_ratio=0.28), 2941), (dict(warmup_steps=0.28), 2941),
                                           (dict(warmup_steps=2940), 2940)])
def test_linear_and_groupbert_schedules_warm_up_over_the_same_steps(tmp_path, warmup, steps):
    args = make_args(tmp_path, **warmup)
    assert args.get_warmup_steps(10500) == steps  # a ratio: ceil(10500 x 0.28) of floats, 2940.0000000000005
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    linear = get_scheduler("linear", optimizer, num_warmup_steps=args.get_warmup_steps(10500), num_training_steps=10500)
    groupbert = get_groupbert_schedule(optimizer, num_warmup_steps=args.get_warmup_steps(10500), num_training_steps=10500)
    for schedule in (linear, groupbert):
        before, at = lr_multipliers(schedule, [steps - 1, steps])
        assert before < 1.0 and at == pytest.approx(1.0)


def test_the_trainer_builds_the_groupbert_schedule_with_the_runs_warmup(tmp_path):
    args = make_args(tmp_path, warmup_ratio=0.25, max_steps=8, learning_rate=1e-3)
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=IPUConfig(layers_per_ipu=[-1]), args=args,
                         data_collator=default_data_collator, scheduler_factory=get_groupbert_schedule)
    trainer.create_optimizer()
    scheduler = trainer.create_scheduler(num_training_steps=8)
    assert lr_multipliers(scheduler, [1, 2]) == pytest.approx([0.5**0.5, 1.0])  # warmup ceil(8 x 0.25) = 2


# ---- the layer check needs only the model config ------------------------------------------------------------


def test_layers_per_ipu_is_checked_against_the_model_config(tmp_path):
    config = BertConfig(num_hidden_layers=48)
    with pytest.raises(IncompatibleIPUConfigError, match=r"\[0, 4, 4, 4\] places 12 layers but the model has 48"):
        resolve_run(four_ipu_config(), make_args(tmp_path), config)
    resolve_run(four_ipu_config(), make_args(tmp_path), BertConfig(num_hidden_layers=12))


def test_the_seed_readmes_48_layer_command_fails_before_any_weights_or_data(tmp_path, monkeypatch, capsys):
    """The seed README's model-on-the-fly command with the seed ipu_config.json ([0,4,4,4]: 12 layers). The hub's
    bert-base-uncased config is stood in for by a local folder with the same (BertConfig default) values."""
    bert_base = tmp_path / "bert-base-uncased"
    BertConfig().save_pretrained(bert_base)

    def must_not_run(*args, **kwargs):
        raise AssertionError("weights, tokenizer or data were loaded before the layer check")

    for name in ("load_tokenizer", "load_model", "load_raw_datasets"):
        monkeypatch.setattr(run_pretraining, name, must_not_run)
    monkeypatch.setattr(sys, "argv", [
        "run_pretraining.py", "--config_name", str(bert_base), "--tokenizer_name", "bert-base-uncased",
        "--ipu_config_name", SEED_IPU_CONFIG_DIR, "--dataset_name", "Graphcore/wikipedia-bert-128", "--do_train",
        "--do_eval", "--output_dir", str(tmp_path / "out"),
        "--config_overrides=hidden_size=1024,num_attention_heads=16,num_hidden_layers=48",
    ])
    start = time.perf_counter()
    assert run_cli(run_pretraining.main) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "places 12 layers but the model has 48" in err[0]


# ---- modes that would train wrong are refused ---------------------------------------------------------------


def test_several_gpus_in_one_process_are_refused_with_the_torchrun_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(IPUTrainingArguments, "n_gpu", property(lambda self: 4))  # nn.DataParallel territory
    with pytest.raises(ValueError, match=r"torchrun --nproc_per_node 4"):
        resolve_run(four_ipu_config(), make_args(tmp_path))
    monkeypatch.setattr(sys, "argv", ["run_pretraining.py", "--model_type", "bert", "--ipu_config_name",
                                      SEED_IPU_CONFIG_DIR, "--dataset_name", "x", "--output_dir", str(tmp_path / "o")])
    assert run_cli(run_pretraining.main) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrun --nproc_per_node 4 run_pretraining.py" in err[0]


# ---- the loop's view: workers, DDP, empty cache ------------------------------------------------------------


def test_dataloader_workers_are_capped_per_local_process(monkeypatch):
    monkeypatch.setattr("ipu_trainer.run.resolved_run.cpus_available", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    workers, note = dataloader_workers(64, "async_rebatched")
    assert workers == 2 and "8 process(es) share 16 CPUs" in note
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert dataloader_workers(8, "sync") == (8, None)
    assert dataloader_workers(0, "async")[0] == 4  # the async modes start workers of their own


def test_the_loop_gets_the_capped_workers_and_the_users_arguments_keep_theirs(tmp_path, monkeypatch):
    monkeypatch.setattr("ipu_trainer.run.resolved_run.cpus_available", lambda: 2)
    args = make_args(tmp_path, dataloader_num_workers=64)
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=IPUConfig(layers_per_ipu=[-1]), args=args,
                         data_collator=default_data_collator, train_dataset=masked_pairs(8))
    assert trainer.args.dataloader_num_workers == 2 and args.dataloader_num_workers == 64


def test_ddp_does_not_search_for_unused_parameters_in_the_packages_models(tmp_path):
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16)
    trainer = IPUTrainer(model=BertForPreTrainingMaskedPositions(config), ipu_config=IPUConfig(layers_per_ipu=[-1]),
                         args=make_args(tmp_path), data_collator=default_data_collator)
    assert trainer.accelerator.ddp_handler.find_unused_parameters is False
    explicit = make_args(tmp_path, ddp_find_unused_parameters=True)
    trainer = IPUTrainer(model=BertForPreTrainingMaskedPositions(config), ipu_config=IPUConfig(layers_per_ipu=[-1]),
                         args=explicit, data_collator=default_data_collator)
    assert trainer.accelerator.ddp_handler.find_unused_parameters is True


def test_torch_empty_cache_steps_is_honoured(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("ipu_trainer.training.trainer.clear_device_cache", lambda: calls.append(1))
    args = make_args(tmp_path, max_steps=4, torch_empty_cache_steps=2, per_device_train_batch_size=2,
                     save_strategy="no")
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=IPUConfig(layers_per_ipu=[-1]), args=args,
                         data_collator=default_data_collator, train_dataset=masked_pairs(16))
    trainer.train()
    assert len(calls) == 2  # before steps 0 and 2 were counted, as upstream
