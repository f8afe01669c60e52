"""GPU configurations modelled on the CPU (--device_model): a pairwise covering subset of GPU x processes x
optimizer_state_offchip x replicated_tensor_sharding x --packing x float16 loss scale, each a few steps of a tiny
BERT with finite weights, the expected updates and the GPU's decisions; three of them resume to the weights of the
uninterrupted run. The subset (ddp_worker.DEVICE_MATRIX, 8 of the 80 combinations):

| GPU  | processes | offload | sharding | packing | loss scale | resume |
| ---- | --------- | ------- | -------- | ------- | ---------- | ------ |
| V100 | 1         | on      | off      | off     | static     | yes    |
| V100 | 2         | off     | on       | on      | static     |        |
| V100 | 1         | off     | on       | off     | dynamic    |        |
| V100 | 2         | on      | off      | on      | dynamic    | yes    |
| A100 | 1         | on      | on       | on      | (bfloat16) |        |
| A100 | 2         | off     | off      | off     | (bfloat16) |        |
| H100 | 1         | off     | off      | on      | (bfloat16) |        |
| H100 | 2         | on      | on       | off     | (bfloat16) | yes    |

The 1-process cases run in this process; the 2-process ones in one torchrun launch (gloo).

The tests marked `cuda` run the same cases for real on a CUDA GPU (bench/gpu_check.sh): the 1-process cases on one
GPU, the 2-process ones with NCCL where there are two. There the V100 cases train in float16 (--fp16) and the others
in bfloat16, whatever the GPU at hand; resuming is compared with deterministic algorithms.
"""

import itertools
import json
import os

import pytest
import torch

from conftest import assert_same_weights, launch_worker
from ddp_worker import DEVICE_MATRIX, DEVICE_MATRIX_STEPS, LOSS_SCALE, device_case_name, run_device_case

SETTINGS = ("gpu", "processes", "offload", "sharding", "packing", "loss")
VALUES = {"gpu": ("V100", "A100", "H100"), "processes": (1, 2), "offload": (True, False), "sharding": (True, False),
          "packing": (True, False), "loss": ("static", "dynamic")}
FLOAT16_GPUS = ("V100",)  # the loss scale is a setting only where the GPU trains in float16


def test_the_subset_covers_every_pair_of_settings_and_is_the_docstrings_table():
    for first, second in itertools.combinations(SETTINGS, 2):
        cases = DEVICE_MATRIX
        if "loss" in (first, second):
            cases = [case for case in DEVICE_MATRIX if case["gpu"] in FLOAT16_GPUS]
        wanted = {(a, b) for a, b in itertools.product(VALUES[first], VALUES[second])
                  if "gpu" not in (first, second) or "loss" not in (first, second) or a in FLOAT16_GPUS}
        assert {(case[first], case[second]) for case in cases} >= wanted, (first, second)
    for case in DEVICE_MATRIX:
        assert (case["loss"] is not None) == (case["gpu"] in FLOAT16_GPUS), case
    rows = [line.split("|")[1:-1] for line in __doc__.splitlines() if line.startswith("| ") and "GPU" not in line and "---" not in line]
    on = {"on": True, "off": False}
    documented = [dict(gpu=r[0].strip(), processes=int(r[1]), offload=on[r[2].strip()], sharding=on[r[3].strip()],
                       packing=on[r[4].strip()], loss=None if "(" in r[5] else r[5].strip(), resume=r[6].strip() == "yes")
                  for r in rows]
    assert documented == list(DEVICE_MATRIX)


def check_report(case, report, resumed=False, on_gpu=False):
    float16 = case["gpu"] in FLOAT16_GPUS
    assert report["world_size"] == case["processes"] and report["device"].startswith("cuda" if on_gpu else "cpu")
    assert report["precision"] == ("fp16" if float16 else "bf16") and report["autocast"]
    expected_scaler = {"static": "StaticLossScaler", "dynamic": "GradScaler", None: None}[case["loss"]]
    assert report["scaler"] == expected_scaler
    assert report["scale"] == (LOSS_SCALE if float16 else None)  # no overflow at this scale: never halved
    assert report["finite"] and report["global_step"] == DEVICE_MATRIX_STEPS
    # One update per step (device_iterations 1); a resumed run makes only the steps after its checkpoint.
    assert report["updates"] == (DEVICE_MATRIX_STEPS // 2 if resumed else DEVICE_MATRIX_STEPS)
    assert report["offloaded"] == case["offload"]  # optimizer_state_offchip on a GPU: host memory
    assert report["sharded"] == (case["sharding"] and case["processes"] > 1)
    assert report["packed"] == case["packing"]
    if on_gpu:  # the real MFU, where the GPU is in the MFU table
        assert "modelled_mfu" not in report["log"][-1]
    else:
        assert "modelled_mfu" in report["log"][-1] and "mfu" not in report["log"][-1]


def one_process_cases():
    return [pytest.param(case, id=device_case_name(case)) for case in DEVICE_MATRIX if case["processes"] == 1]


@pytest.mark.slow
@pytest.mark.parametrize("case", one_process_cases())
def test_one_process_case(case, tmp_path):
    check_report(case, run_device_case(case, str(tmp_path / "straight")))
    if case["resume"]:
        checkpoint = tmp_path / "straight" / f"checkpoint-{DEVICE_MATRIX_STEPS // 2}"
        check_report(case, run_device_case(case, str(tmp_path / "resumed"), resume=str(checkpoint)), resumed=True)
        assert_same_weights(tmp_path / "straight", tmp_path / "resumed")


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_matrix")
    launch_worker(out, "--device_matrix", processes=2)
    return out


@pytest.mark.slow
def test_two_process_cases_in_one_torchrun_launch(two_process_runs):
    cases = [case for case in DEVICE_MATRIX if case["processes"] == 2]
    assert sorted(os.listdir(two_process_runs)) == sorted(map(device_case_name, cases))
    for case in cases:
        run = two_process_runs / device_case_name(case)
        for rank in (0, 1):  # every process models the same GPU and takes the same decisions
            with open(run / f"rank{rank}.json") as handle:
                reports = json.load(handle)
            assert [report["rank"] for report in reports] == [rank] * len(reports)
            check_report(case, reports[0])
            if case["resume"]:
                check_report(case, reports[1], resumed=True)
        if case["resume"]:
            assert_same_weights(run / "straight", run / "resumed")


# ---- the same cases for real on CUDA GPUs (bench/gpu_check.sh) ------------------------------------------------------

# Resuming on a GPU reaches the same weights only with deterministic kernels: cuBLAS needs this workspace setting
# before its first use, hence at import, before any test runs.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
GPU_RESUME_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture
def deterministic_kernels():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.cuda
@pytest.mark.parametrize("case", one_process_cases())
def test_one_process_case_on_the_gpu(case, tmp_path, deterministic_kernels):
    check_report(case, run_device_case(case, str(tmp_path / "straight"), on_gpu=True), on_gpu=True)
    if case["resume"]:
        checkpoint = tmp_path / "straight" / f"checkpoint-{DEVICE_MATRIX_STEPS // 2}"
        resumed = run_device_case(case, str(tmp_path / "resumed"), resume=str(checkpoint), on_gpu=True)
        check_report(case, resumed, resumed=True, on_gpu=True)
        assert_same_weights(tmp_path / "straight", tmp_path / "resumed", **GPU_RESUME_TOLERANCE)


@pytest.mark.cuda
@pytest.mark.two_gpus
def test_two_process_cases_on_two_gpus(tmp_path):
    launch_worker(tmp_path, "--device_matrix", "--on_gpu", processes=2)
    for case in (case for case in DEVICE_MATRIX if case["processes"] == 2):
        run = tmp_path / device_case_name(case)
        for rank in (0, 1):
            with open(run / f"rank{rank}.json") as handle:
                reports = json.load(handle)
            check_report(case, reports[0], on_gpu=True)
            if case["resume"]:
                check_report(case, reports[1], resumed=True, on_gpu=True)
        if case["resume"]:
            assert_same_weights(run / "straight", run / "resumed", **GPU_RESUME_TOLERANCE)
