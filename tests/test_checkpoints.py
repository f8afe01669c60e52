"""Checkpoints that survive crashes, resume that never needs a hand, and one run per output folder."""

import errno
import json
import os
import subprocess
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import default_data_collator
from transformers.trainer_utils import TrainOutput

from ipu_trainer import IPUConfig, IPUTrainer, IPUTrainingArguments
from ipu_trainer.cli.startup import claim_output_dir, run_cli, train_and_save
from ipu_trainer.training.checkpoints import (
    COMPLETION_MARKER,
    checkpoint_problem,
    last_resumable_checkpoint,
    list_checkpoints,
    rotate_checkpoints,
)
from ipu_trainer.training.run_control import CheckpointWriteError, RunFinished
from ipu_trainer.training.run_record import RunRecord, weight_shaping_arguments
from tiny import masked_pairs, tiny_bert

STEPS = 6


def make_args(output_dir, **values):
    defaults = dict(output_dir=str(output_dir), per_device_train_batch_size=2, learning_rate=1e-3, weight_decay=0.01,
                    lr_scheduler_type="linear", max_steps=STEPS, fp32=True, report_to=[], save_strategy="steps",
                    save_steps=2, seed=0, disable_tqdm=True, use_cpu=True, logging_steps=1)
    return IPUTrainingArguments(**{**defaults, **values})


def train(output_dir, resume=None, **values):
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=IPUConfig(layers_per_ipu=[-1], gradient_accumulation_steps=2),
                         args=make_args(output_dir, **values), data_collator=default_data_collator,
                         train_dataset=masked_pairs(64))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def weights(trainer):
    return {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A complete run: checkpoints 2, 4 and 6, and its final weights."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, weights(train(out))


# ---- what a complete checkpoint is --------------------------------------------------------------------------


def copy_checkpoints(source, target):
    target.mkdir(parents=True, exist_ok=True)
    for path in list_checkpoints(str(source)):
        subprocess.run(["cp", "-r", path, str(target)], check=True)


def test_every_saved_checkpoint_is_marked_complete_and_resumable(uninterrupted):
    out, _ = uninterrupted
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-6", "checkpoint-4", "checkpoint-2"]
    for path in list_checkpoints(str(out)):
        marker = json.loads(open(os.path.join(path, COMPLETION_MARKER)).read())
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= marker["files"].keys()
        assert checkpoint_problem(path) is None


@pytest.mark.parametrize("damage, reason", [
    ([("remove", "optimizer.pt")], "optimizer.pt is missing"),
    ([("remove", "scheduler.pt")], "scheduler.pt is missing"),
    ([("truncate", "optimizer.pt")], "optimizer.pt has"),
    ([("flip", "model.safetensors")], "model.safetensors is corrupt"),
    ([("flip", "rng_state.pth")], "rng_state.pth is corrupt"),
    ([("remove", COMPLETION_MARKER), ("truncate", "optimizer.pt")], "optimizer.pt is not a readable torch file"),
    ([("remove", COMPLETION_MARKER), ("remove", "trainer_state.json")], "no trainer_state.json"),
], ids=["no-optimizer", "no-scheduler", "truncated-optimizer", "corrupt-weights", "corrupt-rng", "legacy-truncated",
        "legacy-no-state"])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_complete_one(uninterrupted, tmp_path, damage, reason):
    out, _ = uninterrupted
    copy_checkpoints(out, tmp_path)
    for action, name in damage:
        path = tmp_path / "checkpoint-6" / name
        data = path.read_bytes()
        if action == "remove":
            os.remove(path)
        elif action == "truncate":
            path.write_bytes(data[: len(data) // 2])
        else:  # flip one byte: same size, different content
            changed = bytearray(data)
            changed[len(changed) // 2] ^= 0xFF
            path.write_bytes(bytes(changed))
    checkpoint, skipped = last_resumable_checkpoint(str(tmp_path))
    assert checkpoint == str(tmp_path / "checkpoint-4")
    assert len(skipped) == 1 and reason in skipped[0].reason


def test_a_legacy_checkpoint_without_marker_resumes_when_complete(uninterrupted, tmp_path):
    out, _ = uninterrupted
    copy_checkpoints(out, tmp_path)
    os.remove(tmp_path / "checkpoint-6" / COMPLETION_MARKER)
    assert last_resumable_checkpoint(str(tmp_path)) == (str(tmp_path / "checkpoint-6"), [])


def test_rotation_keeps_the_newest_complete_checkpoint_and_the_best(tmp_path):
    for step in (1, 2, 3, 4, 5):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if step != 5:  # checkpoint-5 is an interrupted save: newer than every complete one
            (folder / COMPLETION_MARKER).write_text("{}")
    (tmp_path / "checkpoint-0").mkdir()  # an interrupted save older than the newest complete one
    deleted = rotate_checkpoints(str(tmp_path), save_total_limit=1, keep=(str(tmp_path / "checkpoint-2"),))
    remaining = sorted(os.listdir(tmp_path))
    assert remaining == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    assert len(deleted) == 3
    assert rotate_checkpoints(str(tmp_path), save_total_limit=None) == []


# ---- resuming in the trainer -------------------------------------------------------------------------------


def test_resume_falls_back_past_damaged_checkpoints_and_matches_an_uninterrupted_run(uninterrupted, tmp_path, caplog):
    out, expected = uninterrupted
    copy_checkpoints(out, tmp_path)
    for step in (6, 4):  # the two newest are unusable: missing optimizer, and a half-written checkpoint
        subprocess.run(["rm", "-rf", str(tmp_path / f"checkpoint-{step}")], check=True)
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "config.json").write_text("{}")
    resumed = train(tmp_path, resume=True)
    assert_same_weights(weights(resumed), expected)
    assert any("checkpoint-4" in r.getMessage() and "Skipped" in r.getMessage() for r in caplog.records)
    assert checkpoint_problem(str(tmp_path / "checkpoint-4")) is None  # saved again, complete this time


def test_an_explicit_incomplete_checkpoint_is_refused_in_one_line(uninterrupted, tmp_path):
    out, _ = uninterrupted
    copy_checkpoints(out, tmp_path)
    os.remove(tmp_path / "checkpoint-6" / "optimizer.pt")
    with pytest.raises(ValueError, match=r"cannot resume from it: optimizer.pt is missing; the newest complete "
                                         r"checkpoint there is .*checkpoint-4"):
        train(tmp_path / "elsewhere", resume=str(tmp_path / "checkpoint-6"))


def test_process_zero_decides_the_checkpoint_of_every_process(tmp_path, monkeypatch):
    """Simulated process 1 of two: it resumes what process 0 found, or raises process 0's error, without looking at
    its own folder (on another machine it could hold another newest checkpoint)."""
    import ipu_trainer.training.trainer as trainer_module

    trainer = IPUTrainer(model=tiny_bert(), ipu_config=IPUConfig(layers_per_ipu=[-1]), args=make_args(tmp_path),
                         data_collator=default_data_collator, train_dataset=masked_pairs(8))
    monkeypatch.setattr(type(trainer.args), "process_index", property(lambda self: 1))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    from_process_zero = []

    def broadcast_object_list(objects, src):
        assert src == 0 and objects == [None]
        objects[0] = from_process_zero[-1]

    def look_in_own_folder(*args, **kwargs):
        raise AssertionError("process 1 chose a checkpoint itself")

    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(trainer_module, "last_resumable_checkpoint", look_in_own_folder)
    monkeypatch.setattr(trainer_module, "checkpoint_problem", look_in_own_folder)
    from_process_zero.append(("value", "/machine-0/out/checkpoint-4"))
    assert trainer._checkpoint_to_resume(True) == "/machine-0/out/checkpoint-4"
    from_process_zero.append(("error", "--resume_from_checkpoint c: cannot resume from it: it has no optimizer.pt"))
    with pytest.raises(ValueError, match="cannot resume from it: it has no optimizer.pt"):
        trainer._checkpoint_to_resume(str(tmp_path / "checkpoint-4"))


def test_a_resume_reads_the_optimizer_state_into_host_memory_for_the_offloaded_optimizer(uninterrupted, tmp_path,
                                                                                         monkeypatch):
    """As on one of several GPUs, where upstream maps optimizer.pt onto the device (simulated by a "meta" device,
    which holds no values): the offloaded optimizer must receive host tensors, the saved ones."""
    from ipu_trainer.training.optimizer_state import HostOffloadedOptimizer

    out, _ = uninterrupted
    monkeypatch.setattr(IPUTrainer, "_offloads_optimizer_state", lambda self, args: True)  # as a GPU chooses
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=IPUConfig(layers_per_ipu=[-1]), args=make_args(tmp_path),
                         data_collator=default_data_collator, train_dataset=masked_pairs(8))
    trainer.create_optimizer_and_scheduler(num_training_steps=STEPS)
    received = []
    original_load = HostOffloadedOptimizer.load_state_dict
    monkeypatch.setattr(HostOffloadedOptimizer, "load_state_dict",
                        lambda self, state: (received.append(state), original_load(self, state))[-1])
    monkeypatch.setattr(type(trainer.args), "world_size", property(lambda self: 2))
    monkeypatch.setattr(type(trainer.args), "device", property(lambda self: torch.device("meta")))
    trainer._load_optimizer_and_scheduler(str(out / "checkpoint-2"))
    saved = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)
    [state] = received
    for index, values in saved["state"].items():
        for name, value in values.items():
            assert state["state"][index][name].device.type == "cpu"
            torch.testing.assert_close(trainer.optimizer.state_dict()["state"][index][name], value, rtol=0, atol=0)
    assert trainer.lr_scheduler.state_dict()["last_epoch"] == 2


def test_a_checkpoint_at_the_last_step_is_loaded_not_trained_past(uninterrupted, tmp_path):
    out, expected = uninterrupted
    copy_checkpoints(out, tmp_path)
    trainer = train(tmp_path, resume=True)
    assert trainer.state.global_step == STEPS
    assert_same_weights(weights(trainer), expected)
    assert not (tmp_path / f"checkpoint-{STEPS + 1}").exists()


def test_a_full_disk_while_saving_is_one_line_and_leaves_the_previous_checkpoint(uninterrupted, tmp_path, monkeypatch):
    _, expected = uninterrupted
    original_save = torch.save

    def save_until_the_disk_fills(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path) and str(path).endswith("optimizer.pt"):
            with open(path, "wb") as handle:
                handle.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    with pytest.raises(CheckpointWriteError, match=r"could not write .*checkpoint-4 \(no space left on the device\).*"
                                                   r"GB free.*checkpoint-2 is complete"):
        train(tmp_path)
    assert not (tmp_path / "checkpoint-4").exists()
    assert checkpoint_problem(str(tmp_path / "checkpoint-2")) is None
    monkeypatch.setattr(torch, "save", original_save)
    assert_same_weights(weights(train(tmp_path, resume=True)), expected)


# ---- the output folder: lock, finished runs, --overwrite_output_dir ---------------------------------------------


def test_a_finished_run_rerun_unchanged_changes_nothing(uninterrupted, tmp_path):
    out, _ = uninterrupted
    copy_checkpoints(out, tmp_path)
    (tmp_path / "train_results.json").write_text("{}")
    (tmp_path / "trainer_state.json").write_text((out / "checkpoint-6" / "trainer_state.json").read_text())
    record = RunRecord(weight_shaping_arguments(make_args(tmp_path, do_train=True)))
    record.mark_finished(str(tmp_path))
    files = [name for name in os.listdir(tmp_path) if os.path.isfile(tmp_path / name)]
    before = {name: (tmp_path / name).read_bytes() for name in files}
    with pytest.raises(RunFinished, match=r"already holds this run, finished .*, 6 of 6 steps: nothing to do"):
        claim_output_dir(make_args(tmp_path, do_train=True))
    after = {name: (tmp_path / name).read_bytes() for name in files}
    assert after == before and len(list_checkpoints(str(tmp_path))) == 3
    # A longer run of the same folder goes on from the last checkpoint.
    assert claim_output_dir(make_args(tmp_path, do_train=True, max_steps=8)).checkpoint == str(tmp_path / "checkpoint-6")


def test_overwrite_output_dir_sets_the_old_checkpoints_aside(uninterrupted, tmp_path, monkeypatch):
    out, _ = uninterrupted
    copy_checkpoints(out, tmp_path)
    args = make_args(tmp_path, do_train=True, overwrite_output_dir=True)
    claim = claim_output_dir(args)
    assert claim.checkpoint is None and claim.set_aside
    assert len(list_checkpoints(str(tmp_path))) == 3  # nothing moves before every input was accepted
    trained = []
    monkeypatch.setattr(IPUTrainer, "train", lambda self, resume_from_checkpoint=None: trained.append(
        (resume_from_checkpoint, list_checkpoints(str(tmp_path)))) or TrainOutput(0, 0.0, {}))
    trainer = IPUTrainer(model=tiny_bert(), ipu_config=IPUConfig(layers_per_ipu=[-1]), args=args,
                         data_collator=default_data_collator, train_dataset=masked_pairs(8))
    train_and_save(trainer, args, claim, 8)
    assert trained == [(None, [])]  # moved aside before training started, and not resumed
    assert list_checkpoints(str(tmp_path)) == []
    aside = [name for name in os.listdir(tmp_path) if name.startswith("overwritten-")]
    assert len(aside) == 1 and sorted(os.listdir(tmp_path / aside[0])) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert RunRecord.read(str(tmp_path)).identity == claim.record.identity  # the folder now holds the new run
    # A later run of the same command does not resume from the overwritten run (here: nothing of the new run
    # was saved yet, so it starts afresh).
    assert claim_output_dir(make_args(tmp_path, do_train=True)).checkpoint is None


def test_run_cli_releases_the_lock_and_reports_a_finished_run(tmp_path, capsys):
    (tmp_path / "run.lock").parent.mkdir(exist_ok=True)

    def main():
        claim_output_dir(make_args(tmp_path, do_train=True))
        assert (tmp_path / "run.lock").exists()
        raise RunFinished("already finished")

    assert run_cli(main) == 0
    assert capsys.readouterr().err.strip() == "already finished"
    assert not (tmp_path / "run.lock").exists()


def test_the_saved_weights_are_the_final_checkpoints(uninterrupted):
    out, expected = uninterrupted
    saved = load_file(str(out / "checkpoint-6" / "model.safetensors"))
    for name, value in saved.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


def test_torchs_own_disk_full_error_is_recognised_by_the_free_space(uninterrupted, tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError from its zip writer, not as ENOSPC."""
    original_save = torch.save

    def save_until_the_disk_fills(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path) and str(path).endswith("optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 512")
        return original_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    monkeypatch.setattr("ipu_trainer.training.trainer.shutil.disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000))
    with pytest.raises(CheckpointWriteError, match=r"no space left on the device\): 0.00 GB free"):
        train(tmp_path)
    assert checkpoint_problem(str(tmp_path / "checkpoint-2")) is None


def test_a_write_error_without_a_message_is_named_by_its_type(tmp_path, monkeypatch):
    original_save = torch.save

    def save_failing_silently(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path) and str(path).endswith("optimizer.pt"):
            raise RuntimeError()
        return original_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_failing_silently)
    with pytest.raises(CheckpointWriteError, match=r"could not write .*checkpoint-4 \(RuntimeError\)"):
        train(tmp_path)


def test_the_trainer_times_each_step_and_checkpoint_against_torchruns_shutdown_timeout(tmp_path, monkeypatch, caplog):
    import ipu_trainer.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "torchrun_shutdown_timeout", lambda: (0.0, "a test's"))
    train(tmp_path, max_steps=1, save_steps=1)
    assert any("longer than the 0 s torchrun waits" in r.getMessage() and "a test's" in r.getMessage()
               for r in caplog.records)


def test_an_fsdp_checkpoint_needs_both_of_accelerates_files(tmp_path):
    """--fsdp writes optimizer.bin and pytorch_model_fsdp.bin (accelerate's layout): one without the other is an
    interrupted save, named by the missing file."""
    from safetensors.torch import save_file

    (tmp_path / "trainer_state.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    for name in ("scheduler.pt", "optimizer.bin"):
        torch.save({}, tmp_path / name)
    assert checkpoint_problem(str(tmp_path)).startswith("it has no pytorch_model_fsdp.bin")
    torch.save({}, tmp_path / "pytorch_model_fsdp.bin")
    assert checkpoint_problem(str(tmp_path)) is None
    (tmp_path / "optimizer.bin").unlink()
    assert checkpoint_problem(str(tmp_path)).startswith("it has no optimizer.bin")
