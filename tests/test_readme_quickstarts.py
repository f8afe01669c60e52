"""The README's offline quick starts, run verbatim: every ```bash block of the README that builds the quick-start
assets is run by bash, line for line, in a fresh folder holding the scripts and `ipu_config.json` (as a user runs
it next to the scripts), and what it trains must show the learning the README promises beside it. These are the
slowest tests of the suite (about 3 minutes for the pretraining quick start, less for the others, on 2 CPU cores)."""

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, bash_blocks, read_json

pytestmark = pytest.mark.slow  # several processes or full runs: left out by -m "not slow"

with open(os.path.join(REPO, "README.md")) as _readme:
    QUICK_STARTS = [lines for lines in bash_blocks(_readme.read()) if "ipu_trainer.cli.offline_assets quickstart" in lines[0]]

# What the README promises next to each quick start, checked on the run's own results files: the (masked-token)
# loss falls by more than 1 and the accuracy rises by more than 0.05; pretraining's next-sentence accuracy ends
# at NSP_ACCURACY or more on at least MIN_EVAL_PAIRS held-out pairs.
NSP_ACCURACY = 0.65
MIN_EVAL_PAIRS = 200


def script_of(lines: list[str]) -> str:
    (script,) = {name for name in re.findall(r"python (run_\w+)\.py", "\n".join(lines))}
    return script


def output_dir_of(lines: list[str]) -> str:
    """The training script's `--output_dir` (the last one: prepare_dataset.py's comes first)."""
    return re.findall(r"--output_dir (\S+)", "\n".join(lines))[-1]


def run_verbatim(lines: list[str], folder) -> None:
    for name in ("run_pretraining.py", "run_mlm.py", "run_clm.py", "prepare_dataset.py", "ipu_config.json"):
        os.symlink(os.path.join(REPO, name), folder / name)
    # `python` is the interpreter running the tests (the README's set-up activates its venv the same way).
    environment = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", "\n".join(lines)], cwd=folder, env=environment,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def evaluations(output_dir) -> tuple[dict, dict]:
    """The evaluation before training (`--eval_on_start`, step 0) and the one after it."""
    history = read_json(os.path.join(output_dir, "trainer_state.json"))["log_history"]
    evaluations = [entry for entry in history if "eval_loss" in entry]
    assert evaluations[0]["step"] == 0, "the quick start should evaluate before training (--eval_on_start)"
    return evaluations[0], read_json(os.path.join(output_dir, "eval_results.json"))


def test_every_script_has_a_quick_start():
    assert sorted(map(script_of, QUICK_STARTS)) == ["run_clm", "run_mlm", "run_pretraining"]


@pytest.mark.parametrize("lines", QUICK_STARTS, ids=list(map(script_of, QUICK_STARTS)))
def test_the_quick_start_runs_verbatim_and_learns(lines, tmp_path):
    run_verbatim(lines, tmp_path)
    before, after = evaluations(tmp_path / output_dir_of(lines))
    pretraining = script_of(lines) == "run_pretraining"
    loss, accuracy = ("eval_mlm_loss", "eval_mlm_accuracy") if pretraining else ("eval_loss", "eval_accuracy")
    assert after[loss] < before[loss] - 1.0
    assert after[accuracy] > before[accuracy] + 0.05
    if pretraining:
        assert after["eval_samples"] >= MIN_EVAL_PAIRS
        assert after["eval_nsp_accuracy"] >= NSP_ACCURACY
