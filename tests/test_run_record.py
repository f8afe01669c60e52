"""Which run an output folder holds, and what the same command, another command or --overwrite_output_dir does
with it: every case of `run_record.decide`, on folders with real (tiny) checkpoint files."""

import json
import logging
import os
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

from ipu_trainer import IPUTrainingArguments
from ipu_trainer.training.checkpoints import mark_complete
from ipu_trainer.training.run_record import (
    RECORD_NAME,
    RunRecord,
    decide,
    set_aside_previous_run,
    weight_shaping_arguments,
)


def arguments(tmp_path, **values):
    defaults = dict(output_dir=str(tmp_path), learning_rate=1e-3, max_steps=6, report_to=[], use_cpu=True)
    return IPUTrainingArguments(**{**defaults, **values})


def record_of(tmp_path, **values) -> RunRecord:
    return RunRecord(weight_shaping_arguments(arguments(tmp_path, **values)))


def checkpoint(folder, step: int) -> str:
    """A complete checkpoint-`step`: the files a resume reads, each loadable."""
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))
    torch.save({}, path / "optimizer.pt")
    torch.save({}, path / "scheduler.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 6}))
    mark_complete(str(path))
    return str(path)


def finished(folder, record: RunRecord) -> None:
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 6, "max_steps": 6}))
    (folder / "eval_results.json").write_text("{}")
    record.mark_finished(str(folder))


# ---- the run's identity -------------------------------------------------------------------------------------


def test_the_identity_is_the_arguments_that_shape_the_weights(tmp_path):
    base = record_of(tmp_path)
    # Where and how often things are written, logged and evaluated: the same run.
    for values in ({"output_dir": str(tmp_path / "elsewhere")}, {"logging_steps": 7}, {"save_steps": 3},
                   {"overwrite_output_dir": True}, {"per_device_eval_batch_size": 64}, {"dataloader_num_workers": 2},
                   {"report_to": ["none"]}, {"run_name": "another name"}):
        assert record_of(tmp_path, **values).identity == base.identity, values
    # What changes the weights: another run.
    for values in ({"learning_rate": 5e-4}, {"seed": 1}, {"max_steps": 8}, {"per_device_train_batch_size": 4},
                   {"lamb": True}, {"ipu_config_overrides": "gradient_accumulation_steps=4"}):
        assert record_of(tmp_path, **values).identity != base.identity, values


def test_the_script_arguments_count_too(tmp_path):
    @dataclass
    class DataArguments:
        max_seq_length: int = 128
        preprocessing_num_workers: int = 1

    args = arguments(tmp_path)
    base = RunRecord(weight_shaping_arguments(args, DataArguments()))
    assert base.arguments["max_seq_length"] == 128 and "preprocessing_num_workers" not in base.arguments
    assert RunRecord(weight_shaping_arguments(args, DataArguments(preprocessing_num_workers=8))).identity == base.identity
    assert RunRecord(weight_shaping_arguments(args, DataArguments(max_seq_length=64))).identity != base.identity


def test_a_record_reads_back_as_written_and_names_the_files_its_run_wrote(tmp_path):
    (tmp_path / "notes.txt").write_text("the user's, older than the run")
    os.utime(tmp_path / "notes.txt", (0, 0))
    record = record_of(tmp_path)
    record.write(str(tmp_path))
    assert RunRecord.read(str(tmp_path)).identity == record.identity
    finished(tmp_path, record)
    again = RunRecord.read(str(tmp_path))
    assert again.finished and again.files == ["eval_results.json", "trainer_state.json"]
    assert json.loads((tmp_path / RECORD_NAME).read_text())["identity"] == record.identity
    (tmp_path / RECORD_NAME).write_text("{not json")
    assert RunRecord.read(str(tmp_path)) is None


# ---- what a command does with the folder --------------------------------------------------------------------


def test_an_empty_or_new_folder_starts_afresh(tmp_path):
    for folder in (tmp_path, tmp_path / "new"):
        decision = decide(str(folder), record_of(tmp_path), overwrite=False)
        assert decision.checkpoint is None and not decision.set_aside and decision.finished is None


@pytest.mark.parametrize("overwrite", [False, True])
def test_the_same_command_resumes_its_interrupted_run_with_or_without_overwrite(tmp_path, overwrite):
    record = record_of(tmp_path)
    record.write(str(tmp_path))
    checkpoint(tmp_path, 2)
    newest = checkpoint(tmp_path, 4)
    decision = decide(str(tmp_path), record_of(tmp_path, overwrite_output_dir=overwrite), overwrite=overwrite)
    assert decision.checkpoint == newest and not decision.set_aside
    assert decision.started == record.started  # still the same run


def test_the_same_command_interrupted_before_its_first_checkpoint_starts_again(tmp_path):
    record_of(tmp_path).write(str(tmp_path))
    (tmp_path / "runs").mkdir()  # what the attempt wrote before it was stopped: its own
    decision = decide(str(tmp_path), record_of(tmp_path), overwrite=False)
    assert decision.checkpoint is None and not decision.set_aside


def test_the_same_command_on_its_finished_run_has_nothing_to_do_unless_overwrite(tmp_path):
    record = record_of(tmp_path)
    checkpoint(tmp_path, 6)
    finished(tmp_path, record)
    decision = decide(str(tmp_path), record_of(tmp_path), overwrite=False)
    assert decision.finished and "already holds this run, finished" in decision.finished
    assert "6 of 6 steps: nothing to do" in decision.finished
    again = decide(str(tmp_path), record_of(tmp_path), overwrite=True)
    assert again.set_aside and again.checkpoint is None and again.finished is None


def test_other_arguments_with_overwrite_start_afresh(tmp_path):
    record_of(tmp_path).write(str(tmp_path))
    checkpoint(tmp_path, 4)
    decision = decide(str(tmp_path), record_of(tmp_path, learning_rate=5e-4), overwrite=True)
    assert decision.set_aside and decision.checkpoint is None


def test_other_arguments_without_overwrite_continue_an_interrupted_run_and_say_what_changed(tmp_path, caplog):
    record_of(tmp_path).write(str(tmp_path))
    newest = checkpoint(tmp_path, 4)
    with caplog.at_level(logging.WARNING, logger="ipu_trainer"):
        decision = decide(str(tmp_path), record_of(tmp_path, learning_rate=5e-4), overwrite=False)
    assert decision.checkpoint == newest and decision.started is None
    assert "learning_rate 0.001 there, 0.0005 here" in caplog.text


def test_a_finished_run_is_continued_only_for_a_longer_schedule(tmp_path):
    newest = checkpoint(tmp_path, 6)
    finished(tmp_path, record_of(tmp_path))
    assert decide(str(tmp_path), record_of(tmp_path, max_steps=10), overwrite=False).checkpoint == newest
    with pytest.raises(ValueError, match=r"holds a finished run made with other arguments \(learning_rate 0.001 "
                                         r"there, 0.0005 here\): pass --overwrite_output_dir"):
        decide(str(tmp_path), record_of(tmp_path, learning_rate=5e-4), overwrite=False)


def test_a_folder_without_a_record_resumes_its_checkpoint_or_is_refused(tmp_path):
    newest = checkpoint(tmp_path, 4)
    assert decide(str(tmp_path), record_of(tmp_path), overwrite=False).checkpoint == newest
    other = tmp_path / "other"
    other.mkdir()
    (other / "something.txt").write_text("x")
    with pytest.raises(ValueError, match="is not empty and holds no checkpoint to resume from"):
        decide(str(other), record_of(tmp_path), overwrite=False)
    assert decide(str(other), record_of(tmp_path), overwrite=True).set_aside


# ---- setting a run aside ------------------------------------------------------------------------------------


def test_setting_aside_moves_the_runs_files_only(tmp_path):
    (tmp_path / "notes.txt").write_text("the user's")
    os.utime(tmp_path / "notes.txt", (0, 0))
    checkpoint(tmp_path, 2)
    (tmp_path / "model.safetensors").write_text("weights")
    finished(tmp_path, record_of(tmp_path))
    aside = set_aside_previous_run(str(tmp_path))
    assert sorted(os.listdir(aside)) == ["checkpoint-2", "eval_results.json", "model.safetensors", RECORD_NAME,
                                         "trainer_state.json"]
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", os.path.basename(aside)]
    assert set_aside_previous_run(str(tmp_path)) is None  # nothing left to move


def test_setting_aside_a_run_without_a_record_moves_its_checkpoints_and_results(tmp_path):
    checkpoint(tmp_path, 2)
    for name in ("train_results.json", "trainer_state.json", "config.json"):
        (tmp_path / name).write_text("{}")
    aside = set_aside_previous_run(str(tmp_path))
    assert sorted(os.listdir(aside)) == ["checkpoint-2", "train_results.json", "trainer_state.json"]
    assert "config.json" in os.listdir(tmp_path)  # not known to be the run's: left where it was
