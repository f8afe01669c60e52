"""What a person reads when a script starts: one stream of log lines, each once, and no argument dump."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, quickstart_argv


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
