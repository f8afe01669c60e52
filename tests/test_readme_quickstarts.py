"""The README's offline quick starts, run verbatim: the main one (`bash quickstart.sh`) and every ```bash block
of the README that builds the quick-start assets, run by bash, line for line, in a fresh folder holding the
scripts, `quickstart.sh` and `ipu_config.json` (as a user runs them next to the scripts). What each trains
must show the learning the README promises beside it. The main quick start runs here on a shorter schedule
(QUICKSTART_MAX_STEPS, which quickstart.sh reads): its full 3000 steps and the README's table are checked by
`bench/quickstart.py`."""

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, bash_blocks, read_json

pytestmark = pytest.mark.slow  # several processes or full runs: left out by -m "not slow"

MAIN_QUICK_START = ["bash quickstart.sh"]
with open(os.path.join(REPO, "README.md")) as _readme:
    QUICK_STARTS = [lines for lines in bash_blocks(_readme.read())
                    if lines == MAIN_QUICK_START or "ipu_trainer.cli.offline_assets quickstart" in lines[0]]
with open(os.path.join(REPO, "quickstart.sh")) as _script:
    MAIN_SCRIPT = _script.read().splitlines()

# The main quick start's schedule here, and what it must show by then: the masked-token loss falls by more than
# 1 and the accuracy rises by more than 0.05 on at least MIN_EVAL_PAIRS held-out pairs. (Next-sentence
# prediction starts to learn only later: bench/quickstart.py checks it on the full schedule.) The other quick
# starts run their README schedule and must show the same fall and rise.
SHORT_STEPS = 1000
MIN_EVAL_PAIRS = 200


def script_of(lines: list[str]) -> str:
    (script,) = {name for name in re.findall(r"python (run_\w+)\.py", "\n".join(lines if lines != MAIN_QUICK_START else MAIN_SCRIPT))}
    return script


def output_dir_of(lines: list[str]) -> str:
    """The training script's `--output_dir` (the last one: prepare_dataset.py's comes first)."""
    return re.findall(r"--output_dir (\S+)", "\n".join(lines if lines != MAIN_QUICK_START else MAIN_SCRIPT))[-1]


def run_verbatim(lines: list[str], folder) -> str:
    """Run the block's lines in `folder`; their standard output."""
    for name in ("run_pretraining.py", "run_mlm.py", "run_clm.py", "prepare_dataset.py", "ipu_config.json", "quickstart.sh"):
        os.symlink(os.path.join(REPO, name), folder / name)
    # `python` is the interpreter running the tests (the README's set-up activates its venv the same way).
    environment = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
                       QUICKSTART_MAX_STEPS=str(SHORT_STEPS))
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", "\n".join(lines)], cwd=folder, env=environment,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


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
    printed = run_verbatim(lines, tmp_path)
    output_dir = tmp_path / output_dir_of(lines)
    before, after = evaluations(output_dir)
    pretraining = script_of(lines) == "run_pretraining"
    loss, accuracy = ("eval_mlm_loss", "eval_mlm_accuracy") if pretraining else ("eval_loss", "eval_accuracy")
    assert after[loss] < before[loss] - 1.0
    assert after[accuracy] > before[accuracy] + 0.05
    if lines == MAIN_QUICK_START:
        assert after["eval_samples"] >= MIN_EVAL_PAIRS
        # It ends with the table of what was learned and where the model is.
        assert f"after {SHORT_STEPS} steps" in printed and "masked-token loss" in printed
        assert f"{before[loss]:.3f}" in printed and f"{after[loss]:.3f}" in printed
        assert printed.rstrip().splitlines()[-1].startswith(("model: quickstart/output", "training curves: "))
