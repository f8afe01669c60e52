"""Replicas as torchrun processes (gloo on CPU): the same math as replicas emulated in one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_same_weights, free_port, launch_worker as launch

pytestmark = pytest.mark.slow  # several processes or full runs: left out by -m "not slow"

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def reports(output_dir):
    return [json.load(open(os.path.join(output_dir, name))) for name in sorted(os.listdir(output_dir))
            if name.startswith("rank") and name.endswith(".json")]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Replicas 2 x accumulation 2, emulated in one process: the reference."""
    out = tmp_path_factory.mktemp("one_process")
    launch(out)
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_processes")
    launch(out, processes=2)
    return out


def test_two_processes_reach_the_weights_of_emulated_replicas(one_process, two_processes):
    assert_same_weights(one_process, two_processes)


def test_two_processes_share_each_step_without_overlap_or_loss(one_process, two_processes):
    [reference] = reports(one_process)
    ranks = reports(two_processes)
    assert [r["world_size"] for r in ranks] == [2, 2]
    for step, rows in enumerate(reference["rows_per_step"]):
        seen = ranks[0]["rows_per_step"][step] + ranks[1]["rows_per_step"][step]
        assert len(seen) == len(set(seen)) == 8  # micro 2 x replicas 2 x accumulation 2, none twice
        assert sorted(seen) == sorted(rows)


def test_throughput_counts_the_samples_and_tokens_of_every_process(two_processes):
    for rank in reports(two_processes):
        window = rank["throughput_window"]  # the last logging window: one step
        assert (window["samples"], window["tokens"]) == (8, 8 * 16) and window["seconds"] > 0


def test_each_process_has_joined_its_gloo_threads_when_its_run_ends(two_processes):
    """end_distributed() leaves no gloo thread to interpreter shutdown, where one dropping its last tensors would
    take the GIL mid-shutdown and abort the process (see test below)."""
    threads = [rank["gloo_threads_after_end_distributed"] for rank in reports(two_processes)]
    if None in threads:
        pytest.skip("this system does not list a process's threads in /proc")
    assert threads == [[], []]


def test_a_collective_that_ends_late_does_not_abort_the_process_at_exit(tmp_path):
    """The race at exit, forced (ddp_worker.late_collective_at_exit): without the join in end_distributed() the
    second process ends with "terminate called without an active exception" (exit -6) every time."""
    result = launch(tmp_path, "--late_collective_at_exit", processes=2, check=False)
    assert "terminate called" not in result.stderr
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_sharded_optimizer_state_halves_per_process_and_keeps_the_weights(one_process, two_processes, tmp_path):
    launch(tmp_path, "--sharding", processes=2)
    full = reports(two_processes)[0]["optimizer_state_bytes"]
    shards = [r["optimizer_state_bytes"] for r in reports(tmp_path)]
    assert all(0.4 * full < shard < 0.6 * full for shard in shards), (full, shards)
    assert_same_weights(one_process, tmp_path)


def test_resuming_with_two_processes_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    args = ("--steps", "4", "--save_steps", "2", "--sharding", "--offload", "--lamb")  # the seed ipu_config.json's
    launch(straight, *args)
    result = launch(crashed, *args, "--crash_at_step", "3", processes=2, check=False)
    assert result.returncode != 0
    assert (crashed / "checkpoint-2").is_dir() and not (crashed / "model.safetensors").exists()
    # Process 1 would find another newest checkpoint (its machine's own folder, say): both resume process 0's.
    launch(crashed, *args, "--resume", "--rank1_newest", str(straight / "checkpoint-4"), processes=2)
    assert [len(rank["rows_per_step"]) for rank in reports(crashed)] == [2, 2]  # steps 3 and 4, after checkpoint-2
    assert_same_weights(straight, crashed)


def assert_same_optimizer_state(path_a, path_b):
    a, b = (torch.load(os.path.join(path, "optimizer.pt"), weights_only=True) for path in (path_a, path_b))
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    # Summation order differs between process counts: tolerate rounding, relative to the scale of each kind of
    # state (a parameter whose gradients are all rounding noise has moments of pure noise).
    scale = {}
    for state in a["state"].values():
        for name, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                scale[name] = max(scale.get(name, 0.0), value.abs().max().item())
    for index in a["state"]:
        assert a["state"][index].keys() == b["state"][index].keys()
        for name, value in a["state"][index].items():
            if not torch.is_tensor(value):
                assert b["state"][index][name] == value, (index, name)
                continue
            torch.testing.assert_close(b["state"][index][name], value, rtol=1e-5, atol=1e-5 * scale.get(name, 0.0),
                                       msg=lambda details: f"state {index}, {name}: {details}")


LAYOUTS = ["sharding", "offload", "sharding+offload"]  # as ddp_worker.LAYOUTS
MATRIX_ARGS = ("--resume_matrix", "--accumulation", "1")


@pytest.fixture(scope="module")
def resume_matrix(tmp_path_factory):
    """In 2 processes, for each layout x {AdamW, LAMB}: 4 steps checkpointed every 2, then a fresh run resumed from
    checkpoint-2 (offload forced on, as a GPU would choose it)."""
    out = tmp_path_factory.mktemp("resume_matrix")
    launch(out, *MATRIX_ARGS, processes=2)
    return out


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_resume_continues_with_exactly_the_saved_optimizer_state(resume_matrix, layout, optimizer):
    run = resume_matrix / f"{layout}-{optimizer}"
    checkpoint = torch.load(run / "straight" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    parameters = [index for group in checkpoint["param_groups"] for index in group["params"]]
    assert sorted(checkpoint["state"]) == parameters  # the whole state, whatever process holds it
    assert_same_weights(run / "straight", run / "resumed")
    # The checkpoint written after the resume is the uninterrupted run's: no moment restarted from zero.
    assert_same_optimizer_state(run / "straight" / "checkpoint-4", run / "resumed" / "checkpoint-4")


def test_a_sharded_checkpoint_resumes_in_one_process(resume_matrix, tmp_path):
    launch(tmp_path, *MATRIX_ARGS, "--checkpoints_from", str(resume_matrix))
    resumed = sorted(path.name for path in tmp_path.iterdir() if path.is_dir())
    assert resumed == ["sharding+offload-adamw", "sharding+offload-lamb", "sharding-adamw", "sharding-lamb"]
    for name in resumed:
        assert_same_weights(resume_matrix / name / "straight", tmp_path / name / "resumed")
        assert_same_optimizer_state(resume_matrix / name / "straight" / "checkpoint-4",
                                    tmp_path / name / "resumed" / "checkpoint-4")


def test_a_placement_that_cannot_be_shared_is_refused_before_training(tmp_path):
    assets_free_args = [
        "--model_type", "bert", "--config_overrides", "hidden_size=32,num_hidden_layers=2,num_attention_heads=2",
        "--tokenizer_name", "unused", "--dataset_name", "unused", "--ipu_config_name", REPO,
        "--ipu_config_overrides", "layers_per_ipu=[-1],ipus_per_replica=1,replication_factor=1,gradient_accumulation_steps=1",
        "--do_train", "--output_dir", str(tmp_path / "out"), "--report_to", "none",
    ]
    # The check needs only the IPU config and the process count, so it runs before any model or data loads.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), os.path.join(REPO, "run_pretraining.py"), *assets_free_args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    # Both processes refuse the input; only the first one of the machine prints it.
    assert len(errors) == 1 and "incompatible placement" in errors[0] and "--nproc_per_node 1" in errors[0]
    assert "Traceback (most recent call last):\n  File \"" + os.path.join(REPO, "run_pretraining.py") not in result.stderr
