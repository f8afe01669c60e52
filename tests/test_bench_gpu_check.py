"""bench/gpu_check.sh: refuses a machine without CUDA, selects the CUDA tests, writes its results file and fails
when a part fails. The GPU work itself runs only on a GPU; here an interpreter stand-in plays its parts."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = os.path.join(REPO, "bench", "gpu_check.sh")


def run_check(*args, env=None):
    return subprocess.run(["bash", SCRIPT, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_without_cuda_it_stops_with_one_error_line_and_writes_nothing(tmp_path):
    results = tmp_path / "results.txt"
    done = run_check(results, env={"PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: bench/gpu_check.sh needs a CUDA GPU")
    assert not results.exists()


@pytest.fixture
def stand_in_python(tmp_path):
    """An interpreter that says it sees a GPU and echoes each command it is given; FAIL_PART=<word> makes the
    commands containing that word fail."""
    path = tmp_path / "python"
    path.write_text('#!/usr/bin/env bash\necho "ran: $*"\n'
                    'if [ -n "${FAIL_PART:-}" ] && [[ "$*" == *"$FAIL_PART"* ]]; then exit 1; fi\n')
    path.chmod(0o755)
    return str(path)


def test_it_runs_the_cuda_tests_and_the_bert_base_bench_into_its_results_file(tmp_path, stand_in_python):
    results = tmp_path / "results.txt"
    done = run_check(results, env={"PYTHON": stand_in_python})
    assert done.returncode == 0, done.stdout + done.stderr
    written = results.read_text()
    assert "ran: -m pytest -q -m cuda" in written and "ran: bench/pretrain.py --preset bert-base" in written
    assert written.rstrip().endswith("GPU check passed")

    # A results file in a folder that does not exist is refused (tee would fail and the check still pass).
    missing = run_check(tmp_path / "no-such-folder" / "results.txt", env={"PYTHON": stand_in_python})
    assert missing.returncode == 2 and missing.stderr.startswith("error: the folder of")

    # An existing results file is never overwritten.
    again = run_check(results, env={"PYTHON": stand_in_python})
    assert again.returncode == 2 and again.stderr.startswith("error: ") and results.read_text() == written


@pytest.mark.parametrize("part", ["pytest", "pretrain"])
def test_a_failing_part_fails_the_check_and_the_other_part_still_runs(tmp_path, stand_in_python, part):
    results = tmp_path / "results.txt"
    done = run_check(results, env={"PYTHON": stand_in_python, "FAIL_PART": part})
    assert done.returncode == 1
    written = results.read_text()
    assert "ran: -m pytest" in written and "ran: bench/pretrain.py" in written
    assert "GPU check FAILED" in written


GPU_TEST_FILES = ["tests/test_optimizers.py", "tests/test_optimizer_state.py", "tests/test_packing.py",
                  "tests/test_device_matrix.py"]


def test_the_cuda_marker_selects_the_gpu_tests():
    # The files holding them (collecting the whole suite would cost seconds of the suite's time for the same answer).
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "--collect-only", *GPU_TEST_FILES],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    collected = {line.split("[")[0] for line in done.stdout.splitlines() if "::" in line}
    assert {
        "tests/test_optimizers.py::test_lamb_on_cuda_matches_cpu",
        "tests/test_optimizer_state.py::test_host_offloaded_optimizer_on_a_gpu_keeps_pinned_host_state_and_makes_the_gpu_updates",
        "tests/test_packing.py::test_packed_batch_on_a_gpu_runs_the_memory_efficient_attention_kernel",
        "tests/test_device_matrix.py::test_one_process_case_on_the_gpu",
        "tests/test_device_matrix.py::test_two_process_cases_on_two_gpus",
    } <= collected, done.stdout
    # and the CPU tests of those files are left out
    assert "tests/test_device_matrix.py::test_one_process_case" not in collected
    assert not any("test_packed_pretraining_batch_gives_the_unpacked" in name for name in collected)
