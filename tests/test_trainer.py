"""IPUTrainer keeps the IPU config's batch math: steps, updates, precision, optimizer, placement."""

import copy
import dataclasses
import logging
import math
import os
import re
import signal
from types import SimpleNamespace

import pytest
import torch
from transformers import default_data_collator
from transformers.utils import logging as hf_logging

from ipu_trainer import IncompatibleIPUConfigError, IPUConfig, IPUTrainer, IPUTrainingArguments
from ipu_trainer.cli.startup import run_cli
from ipu_trainer.run.precision import DYNAMIC_GROWTH_INTERVAL, Precision
from ipu_trainer.run.resolved_run import resolve_run
from ipu_trainer.training.optimizers import Lamb
from ipu_trainer.training.trainer import tensorboard_line
from ipu_trainer.training.run_control import TrainingInterrupted
from ipu_trainer.training.trainer import readable_size
from conftest import UpdateCounter
from tiny import masked_pairs, tiny_bert


class RecordingCollator:
    """default_data_collator that remembers every batch it built, in order."""

    def __init__(self):
        self.batches = []

    def __call__(self, examples):
        batch = default_data_collator(examples)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def make_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, per_device_eval_batch_size=2,
        learning_rate=1e-3, weight_decay=0.0, lr_scheduler_type="constant", max_steps=1, fp32=True,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True,
    )
    values.update(overrides)
    return IPUTrainingArguments(**values)


def ipu_config(**values):
    return IPUConfig(layers_per_ipu=[-1], **values)


def test_one_step_is_device_iterations_updates_over_the_combined_batch(tmp_path):
    config = ipu_config(replication_factor=2, gradient_accumulation_steps=4, device_iterations=2)
    model = tiny_bert()
    reference = copy.deepcopy(model)
    collator = RecordingCollator()
    # Plain SGD: an update is then the averaged gradient itself (Adam would hide a wrong scale of it).
    trainer = IPUTrainer(model=model, ipu_config=config, args=make_args(tmp_path, optim="sgd", learning_rate=0.5),
                         data_collator=collator, train_dataset=masked_pairs(64))
    trainer.create_optimizer()
    counter = UpdateCounter(trainer.optimizer)
    trainer.train()

    # One step took one batch of micro 2 x replicas 2 x accumulation 4 x device iterations 2 = 32 samples.
    # (The dataloader builds one batch ahead, so a second batch may have been collated but not used.)
    assert trainer.state.global_step == 1
    assert trainer.state.epoch == pytest.approx(0.5)  # 32 of the 64 samples
    batch = collator.batches[0]
    assert batch["input_ids"].shape[0] == 32

    # ... and made 2 weight updates, each the mean over 8 micro-batches of 2.
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    reference.train()
    for update in range(2):
        optimizer.zero_grad()
        for micro in range(8):
            start = update * 16 + micro * 2
            micro_batch = {k: v[start : start + 2] for k, v in batch.items()}
            (reference(**micro_batch).loss / 8).backward()
        optimizer.step()
    assert counter.updates == 2
    for (name, trained), expected in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(trained.detach(), expected.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_learning_rate_schedule_advances_once_per_step(tmp_path):
    config = ipu_config(device_iterations=3)
    args = make_args(tmp_path, max_steps=4, lr_scheduler_type="linear")
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=config, args=args, data_collator=default_data_collator,
                         train_dataset=masked_pairs(64))
    trainer.train()
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert rates == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert trainer.state.global_step == 4


def test_eval_batches_use_the_inference_values(tmp_path):
    config = ipu_config(replication_factor=4, inference_replication_factor=2, inference_device_iterations=3)
    collator = RecordingCollator()
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=config, args=make_args(tmp_path), data_collator=collator,
                         eval_dataset=masked_pairs(12))
    metrics = trainer.evaluate()
    assert [len(b["input_ids"]) for b in collator.batches] == [12]  # 2 per replica x 2 replicas x 3 iterations
    assert metrics["eval_samples"] if "eval_samples" in metrics else True
    assert math.isfinite(metrics["eval_loss"])


def float16_trainer(tmp_path, loss_scale, dynamic=False, device_iterations=1, **arg_overrides):
    """An IPUTrainer whose run is float16 with loss scaling, as resolved on a GPU without bfloat16, simulated on the
    CPU: accelerate runs float16 autocast and the GradScaler only on GPUs, so the test switches its native AMP on
    the way it does on CUDA (float16 autocast on CPU tensors, scale, unscale before clipping, skip on overflow)."""
    args = make_args(tmp_path, **arg_overrides)
    run = resolve_run(ipu_config(device_iterations=device_iterations), args)
    fp16 = Precision("fp16", "test: a GPU without bfloat16", loss_scale=loss_scale, dynamic_loss_scale=dynamic)
    run = dataclasses.replace(run, precision=fp16)
    model = tiny_bert()
    trainer = IPUTrainer(model=model, args=args, run=run, data_collator=default_data_collator,
                         train_dataset=masked_pairs(16))
    trainer.accelerator.native_amp = True  # what accelerate sets for fp16 on CUDA
    return trainer, model


def test_a_resolved_run_is_not_combined_with_other_arguments_or_ipu_config(tmp_path):
    args = make_args(tmp_path)
    run = resolve_run(ipu_config(), args)
    IPUTrainer(model=tiny_bert(), args=args, run=run)  # the scripts' form: the run's own arguments
    with pytest.raises(TypeError, match="args are not the run's"):
        IPUTrainer(model=tiny_bert(), args=make_args(tmp_path, learning_rate=1.0), run=run)
    with pytest.raises(TypeError, match="either ipu_config or run"):
        IPUTrainer(model=tiny_bert(), ipu_config=ipu_config(), run=run)


def test_float16_overflow_skips_the_update_and_the_schedule_step_and_a_static_scale_stays(tmp_path, caplog):
    trainer, model = float16_trainer(tmp_path, loss_scale=1e30, lr_scheduler_type="linear", max_steps=2)
    assert trainer.args.mixed_precision == "fp16" and trainer.accelerator.mixed_precision == "fp16"
    scaler = trainer.accelerator.scaler
    assert scaler.get_scale() == 1e30
    before = copy.deepcopy(model.state_dict())
    with caplog.at_level("WARNING", logger="ipu_trainer"):
        trainer.train()
    # Every update overflowed in float16: no weight moved, and the learning-rate schedule never advanced.
    for name, value in model.state_dict().items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    assert trainer.lr_scheduler.last_epoch == 0
    assert scaler.get_scale() == pytest.approx(1e30, rel=1e-6)  # static (a float32 tensor): an overflow does not halve it
    skipped = [r.getMessage() for r in caplog.records if "overflowed" in r.getMessage()]
    assert len(skipped) == 2 and "2 in a row" in skipped[-1] and "static loss scale 1e+30" in skipped[-1]


def test_ten_overflowing_updates_in_a_row_with_a_static_scale_stop_the_run_with_one_error_line(tmp_path, capsys):
    # 5 updates per step (device iterations): the 10th, the loop's own update of step 2, is the last one made.
    trainer, model = float16_trainer(tmp_path, loss_scale=1e30, device_iterations=5, max_steps=3,
                                     per_device_train_batch_size=1)
    trainer.create_optimizer()
    counter = UpdateCounter(trainer.optimizer)
    assert run_cli(trainer.train) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: 10 weight updates in a row overflowed"), errors
    assert "--loss_scaling" in errors[0] and "--auto_loss_scaling" in errors[0]
    assert counter.updates == 0 and trainer.state.global_step == 1  # stopped at the end of step 2


def test_float16_with_a_sane_scale_trains_through_intermediate_updates(tmp_path):
    trainer, model = float16_trainer(tmp_path, loss_scale=1024.0, device_iterations=2, lr_scheduler_type="linear",
                                     max_steps=2)
    before = copy.deepcopy(model.state_dict())
    trainer.create_optimizer()
    counter = UpdateCounter(trainer.optimizer)
    trainer.train()
    changed = [n for n, v in model.state_dict().items() if not torch.equal(v, before[n])]
    assert changed and all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert trainer.accelerator.scaler.get_scale() == 1024.0  # static: never grows, and nothing overflowed
    assert trainer.lr_scheduler.last_epoch == 2
    assert counter.updates == 4  # 2 steps x 2 device iterations


def test_dynamic_loss_scale_starts_at_the_given_scale_and_halves_after_an_overflow(tmp_path):
    trainer, _ = float16_trainer(tmp_path, loss_scale=1e30, dynamic=True, max_steps=2)
    scaler = trainer.accelerator.scaler
    assert scaler.get_growth_interval() == DYNAMIC_GROWTH_INTERVAL
    trainer.train()
    assert scaler.get_scale() <= 0.5e30


def test_the_float16_scaler_is_saved_with_checkpoints_and_restored(tmp_path):
    trainer, _ = float16_trainer(tmp_path, loss_scale=1e30, dynamic=True, max_steps=2, save_strategy="steps",
                                 save_steps=2)
    trainer.train()
    saved = trainer.accelerator.scaler.get_scale()
    resumed, _ = float16_trainer(tmp_path, loss_scale=1e30, dynamic=True, max_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert saved < 1e30 and resumed.accelerator.scaler.get_scale() <= saved


def test_lamb_flags_pick_lamb_with_the_right_bias_correction(tmp_path):
    for flag, expected_bias_correction in (("lamb", True), ("lamb_no_bias_correction", False)):
        args = make_args(tmp_path, **{flag: True})
        trainer = IPUTrainer(model=tiny_bert(), ipu_config=ipu_config(), args=args,
                             data_collator=default_data_collator, train_dataset=masked_pairs(4))
        trainer.train()
        assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer, Lamb)
        groups = trainer.optimizer.param_groups
        assert all(g["bias_correction"] is expected_bias_correction for g in groups)


def test_default_optimizer_stays_adamw(tmp_path):
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=ipu_config(), args=make_args(tmp_path),
                         data_collator=default_data_collator, train_dataset=masked_pairs(4))
    trainer.create_optimizer()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(inner, torch.optim.AdamW)


def test_command_line_accumulation_is_forwarded_to_the_ipu_config(tmp_path):
    args = make_args(tmp_path, gradient_accumulation_steps=3, gradient_checkpointing=True, auto_loss_scaling=True)
    config = ipu_config(gradient_accumulation_steps=512)
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=config, args=args, data_collator=default_data_collator)
    config = trainer.ipu_config
    assert config.gradient_accumulation_steps == 3
    assert config.recompute_checkpoint_every_layer is True
    assert config.auto_loss_scaling is True
    # The user's arguments keep their values; only the loop's copy runs one batch per step without accumulation.
    assert args.gradient_accumulation_steps == 3 and trainer.args.gradient_accumulation_steps == 1
    assert trainer.args is not args and trainer.run.args is args


def test_n_ipu_sets_the_replication_factor(tmp_path):
    config = IPUConfig(layers_per_ipu=[1, 1], replication_factor=1)
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=config, args=make_args(tmp_path, n_ipu=8),
                         data_collator=default_data_collator)
    assert trainer.ipu_config.replication_factor == 4
    assert trainer.train_placement.samples_per_update == 2 * 4


def test_layers_per_ipu_must_match_the_model(tmp_path):
    config = IPUConfig(layers_per_ipu=[1, 2])
    with pytest.raises(IncompatibleIPUConfigError, match="has 2"):
        IPUTrainer(model=tiny_bert(), ipu_config=config, args=make_args(tmp_path), data_collator=default_data_collator)


def test_recomputation_uses_activation_checkpointing(tmp_path):
    model = tiny_bert()
    IPUTrainer(model=model, ipu_config=ipu_config(recompute_checkpoint_every_layer=True), args=make_args(tmp_path),
               data_collator=default_data_collator)
    assert model.is_gradient_checkpointing


def test_pad_on_batch_axis_makes_every_step_full(tmp_path):
    collator = RecordingCollator()
    args = make_args(tmp_path, pad_on_batch_axis=True, max_steps=2)
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=ipu_config(gradient_accumulation_steps=2), args=args,
                         data_collator=collator, train_dataset=masked_pairs(6))
    trainer.train()
    assert [len(b["input_ids"]) for b in collator.batches] == [4, 4]


def test_ipu_config_is_saved_with_the_model(tmp_path):
    config = ipu_config(gradient_accumulation_steps=2)
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=config, args=make_args(tmp_path),
                         data_collator=default_data_collator, train_dataset=masked_pairs(8))
    trainer.train()
    trainer.save_model()
    assert IPUConfig.from_pretrained(trainer.args.output_dir).gradient_accumulation_steps == 2


def test_async_dataloader_mode_builds_batches_in_worker_processes(tmp_path):
    args = make_args(tmp_path, dataloader_mode="async", max_steps=2)
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=ipu_config(), args=args, data_collator=default_data_collator,
                         train_dataset=masked_pairs(16))
    assert trainer.get_train_dataloader().num_workers >= 1
    result = trainer.train()
    assert trainer.state.global_step == 2 and math.isfinite(result.training_loss)


def test_the_step_batch_is_not_reported_as_data_parallel(tmp_path, caplog):
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=ipu_config(gradient_accumulation_steps=2),
                         args=make_args(tmp_path), data_collator=default_data_collator, train_dataset=masked_pairs(8))
    with caplog.at_level("INFO", logger="transformers.trainer"):
        trainer.train()
    messages = [r.getMessage() for r in caplog.records]
    assert not any("DataParallel" in m for m in messages)
    # Upstream's per-device batch is the step batch of micro 2 x accumulation 2.
    assert any("Instantaneous batch size per device = 4" in m for m in messages)



def test_the_start_up_block_says_where_tensorboard_writes(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=ipu_config(), args=make_args(tmp_path))
    # tensorboard itself need not be installed: the line depends on --report_to only
    monkeypatch.setattr(trainer.args, "report_to", ["tensorboard"])
    with caplog.at_level("INFO", logger="ipu_trainer"):
        trainer._log_run_layout()
    runs = tmp_path / "out" / "runs"
    expected = f"tensorboard: events in {runs / '<date>_<host>'}; view with: tensorboard --logdir {runs}"
    assert any(expected in message for message in caplog.messages), caplog.messages

    # --logging_dir (or the variable itself) names the folder
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "~/tb")
    folder = os.path.expanduser("~/tb")
    expected = f"tensorboard: events in {folder}; view with: tensorboard --logdir {folder}"
    assert tensorboard_line(trainer.args) == expected
    monkeypatch.setattr(trainer.args, "report_to", [])
    assert tensorboard_line(trainer.args) is None


# ---- step times in the log ----------------------------------------------------------------------------------


def test_slow_steps_get_an_estimate_and_a_signal_says_how_long_the_step_may_still_take(tmp_path, caplog):
    """Steps of 5 minutes on a fake clock that the model's forward advances; SIGTERM arrives 100 s into step 2."""
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=ipu_config(), args=make_args(tmp_path, max_steps=3),
                         data_collator=default_data_collator, train_dataset=masked_pairs(8))
    clock = SimpleNamespace(now=0.0)
    trainer._step_timer.clock = lambda: clock.now

    def forward_takes_time(module, inputs):
        if trainer.state.global_step == 1:
            clock.now += 100
            signal.raise_signal(signal.SIGTERM)
        clock.now += 300 if trainer.state.global_step == 0 else 200

    trainer.model.register_forward_pre_hook(forward_takes_time)
    with caplog.at_level(logging.INFO, logger="ipu_trainer"), pytest.raises(TrainingInterrupted):
        trainer.train()
    messages = [record.getMessage() for record in caplog.records]
    assert "One step took ~5 min: the 2 steps left take ~10 min at this pace" in "\n".join(messages)
    assert ("SIGTERM received: finishing this step (this step may take ~3.3 min more, from the step times so far), "
            "saving a checkpoint and stopping") in "\n".join(messages)
    assert trainer.state.global_step == 2


# ---- save log lines -----------------------------------------------------------------------------------------

UPSTREAM_SAVE_LINES = ("Saving model checkpoint to", "Configuration saved in", "Model weights saved in",
                       "tokenizer config file saved in")


def train_with_two_checkpoints_and_save(tmp_path, tokenizer):
    args = make_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=ipu_config(), args=args, data_collator=default_data_collator,
                         train_dataset=masked_pairs(8), processing_class=tokenizer)
    trainer.train()
    trainer.save_model()


def test_each_save_is_one_log_line(tmp_path, tokenizer, transformers_log, capfd):
    train_with_two_checkpoints_and_save(tmp_path, tokenizer)
    messages = [record.getMessage() for record in transformers_log.records]
    for step in (1, 2):
        about_it = [m for m in messages if f"checkpoint-{step}" in m]
        assert len(about_it) == 1 and re.fullmatch(rf"Saved checkpoint-{step} \(\d+(\.\d)? (kB|MB)\)", about_it[0]), about_it
    final = [m for m in messages if m.startswith(f"Saved the model to {tmp_path}")]
    assert len(final) == 1
    assert not [m for m in messages if m.startswith(UPSTREAM_SAVE_LINES)]
    assert "Writing model shards" not in capfd.readouterr().err  # upstream's progress bar of one shard
    # transformers' own logging is as it was before the saves
    assert logging.getLogger("transformers").getEffectiveLevel() == logging.INFO
    assert hf_logging.is_progress_bar_enabled()


def test_every_upstream_save_line_is_kept_at_debug_level(tmp_path, tokenizer, transformers_log):
    hf_logging.set_verbosity_debug()
    train_with_two_checkpoints_and_save(tmp_path, tokenizer)
    messages = [record.getMessage() for record in transformers_log.records]
    for line in UPSTREAM_SAVE_LINES:
        assert any(m.startswith(line) and "checkpoint-2" in m for m in messages), line
    assert "Saved checkpoint-2 (" in "\n".join(messages)


def test_sizes_read_as_a_person_writes_them():
    assert [readable_size(n) for n in (0, 999, 1000, 812_345, 3_412_000, 45_600_000, 1_234_000_000, 12e12)] == [
        "0 bytes", "999 bytes", "1 kB", "812 kB", "3.4 MB", "45.6 MB", "1.2 GB", "12000 GB"]


# ---- Private upstream touchpoints ---------------------------------------------------------------------------


def test_upstream_still_saves_the_optimizer_through_the_overridden_method(tmp_path, monkeypatch):
    """IPUTrainer._save_optimizer_and_scheduler overrides transformers' private method of that name to gather ZeRO
    shards first; if upstream renames or stops calling it, this fails."""
    import inspect

    from transformers import Trainer

    assert list(inspect.signature(Trainer._save_optimizer_and_scheduler).parameters) == ["self", "output_dir"]
    called = []
    original = IPUTrainer._save_optimizer_and_scheduler
    monkeypatch.setattr(IPUTrainer, "_save_optimizer_and_scheduler",
                        lambda self, output_dir: (called.append(output_dir), original(self, output_dir)))
    args = make_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=ipu_config(), args=args, data_collator=default_data_collator,
                         train_dataset=masked_pairs(4))
    trainer.train()
    assert called and (tmp_path / "out" / "checkpoint-1" / "optimizer.pt").is_file()


def test_upstream_still_loads_the_optimizer_through_the_overridden_method(tmp_path, monkeypatch):
    """IPUTrainer._load_optimizer_and_scheduler overrides transformers' private method of that name so that an
    offloaded or sharded optimizer's state is read into host memory; if upstream renames or stops calling it on a
    resume, this fails."""
    import inspect

    from transformers import Trainer

    assert list(inspect.signature(Trainer._load_optimizer_and_scheduler).parameters) == ["self", "checkpoint"]
    called = []
    original = IPUTrainer._load_optimizer_and_scheduler
    monkeypatch.setattr(IPUTrainer, "_load_optimizer_and_scheduler",
                        lambda self, checkpoint: (called.append(checkpoint), original(self, checkpoint))[-1])
    monkeypatch.setattr(IPUTrainer, "_offloads_optimizer_state", lambda self, args: True)  # as a GPU chooses
    for steps in (1, 2):
        args = make_args(tmp_path, max_steps=steps, save_strategy="steps", save_steps=1)
        trainer = IPUTrainer(model=tiny_bert(), ipu_config=ipu_config(), args=args,
                             data_collator=default_data_collator, train_dataset=masked_pairs(8))
        trainer.train(resume_from_checkpoint=True if steps == 2 else None)
    checkpoint = str(tmp_path / "out" / "checkpoint-1")
    assert checkpoint in called and trainer.state.global_step == 2
    assert trainer.optimizer.state_dict()["state"]  # the resumed state, stepped once more
