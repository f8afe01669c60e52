"""What a person reads when a script starts: one stream of log lines, each once, and no argument dump; and the
training curves a finished run leaves."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import REPO, quickstart_argv

from ipu_trainer.cli.startup import write_training_curves


@pytest.mark.slow
def test_the_start_up_log_is_short_and_says_each_thing_once(assets, tmp_path):
    argv = quickstart_argv("run_mlm", assets, tmp_path / "out", "--max_steps", "1")
    result = subprocess.run([sys.executable, os.path.join(REPO, argv[0]), *argv[1:]], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "***** Running training *****" in line)
    before = lines[:start]
    assert any("***** IPU config on this machine *****" in line for line in before)
    assert not any("Training/evaluation parameters" in line for line in lines)  # the 150-line dump: debug only
    messages = [line.split(" - ", 3)[-1] for line in before if " - INFO - " in line or " - WARNING - " in line]
    assert len(messages) == len(set(messages)), "a log line was printed twice"
    assert len(before) < 60
    # transformers' and datasets' lines come through the same handler and format as the package's own
    assert any(" - INFO - transformers.trainer - " in line for line in lines)
    assert not any(line.startswith("[INFO|") for line in result.stdout.splitlines() + result.stderr.splitlines())


def test_the_resume_command_is_the_command_itself_or_the_same_torchrun(monkeypatch):
    from ipu_trainer.cli.startup import resume_command

    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["run_mlm.py", "--config_overrides", "n_layer=2,n_head=2", "--do_train"])
    assert resume_command() == "python run_mlm.py --config_overrides n_layer=2,n_head=2 --do_train"
    monkeypatch.setattr(sys, "argv", ["run_mlm.py", "--ipu_config_overrides", "layers_per_ipu=[-1]"])
    assert resume_command() == "python run_mlm.py --ipu_config_overrides 'layers_per_ipu=[-1]'"  # quoted for the shell
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resume_command() == "the same torchrun command"


def finished_trainer(output_dir, first_process=True):
    history = [{"loss": 2.0, "learning_rate": 1e-3, "step": 5}, {"loss": 1.0, "learning_rate": 5e-4, "step": 10},
               {"eval_loss": 1.2, "eval_accuracy": 0.4, "step": 10}]
    return SimpleNamespace(is_world_process_zero=lambda: first_process, state=SimpleNamespace(log_history=history),
                           args=SimpleNamespace(output_dir=str(output_dir)))


def test_a_finished_run_draws_its_curves_and_says_where(tmp_path, caplog):
    with caplog.at_level("INFO", logger="ipu_trainer"):
        write_training_curves(finished_trainer(tmp_path))
    assert os.listdir(tmp_path) == ["training_curves.png"]
    assert f"Training curves: {tmp_path / 'training_curves.png'}" in caplog.messages


def test_only_the_first_process_draws(tmp_path):
    write_training_curves(finished_trainer(tmp_path, first_process=False))
    assert os.listdir(tmp_path) == []


def test_curves_that_cannot_be_written_are_a_warning_not_a_failure(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="ipu_trainer"):
        write_training_curves(finished_trainer(tmp_path / "gone"))  # returns: the finished run stays finished
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert caplog.messages[0].startswith("Could not draw the training curves:")
