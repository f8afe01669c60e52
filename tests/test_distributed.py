"""Replicas as torchrun processes (gloo on CPU): the same math as replicas emulated in one process."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
WORKER = os.path.join(TESTS, "ddp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(output_dir, *args, processes=1, check=True):
    if processes == 1:
        command = [sys.executable, WORKER, str(output_dir), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), WORKER, str(output_dir), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def reports(output_dir):
    return [json.load(open(os.path.join(output_dir, name))) for name in sorted(os.listdir(output_dir))
            if name.startswith("rank") and name.endswith(".json")]


def assert_same_weights(dir_a, dir_b):
    a, b = load_file(os.path.join(dir_a, "model.safetensors")), load_file(os.path.join(dir_b, "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


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


def test_sharded_optimizer_state_halves_per_process_and_keeps_the_weights(one_process, two_processes, tmp_path):
    launch(tmp_path, "--sharding", processes=2)
    full = reports(two_processes)[0]["optimizer_state_bytes"]
    shards = [r["optimizer_state_bytes"] for r in reports(tmp_path)]
    assert all(0.4 * full < shard < 0.6 * full for shard in shards), (full, shards)
    assert_same_weights(one_process, tmp_path)


def test_resuming_with_two_processes_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    args = ("--steps", "4", "--save_steps", "2", "--sharding", "--lamb")
    launch(straight, *args)
    result = launch(crashed, *args, "--crash_at_step", "3", processes=2, check=False)
    assert result.returncode != 0
    assert (crashed / "checkpoint-2").is_dir() and not (crashed / "model.safetensors").exists()
    launch(crashed, *args, "--resume", processes=2)
    assert_same_weights(straight, crashed)


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
    assert errors and all("incompatible placement" in line and "--nproc_per_node 1" in line for line in errors)
    assert "Traceback (most recent call last):\n  File \"" + os.path.join(REPO, "run_pretraining.py") not in result.stderr
