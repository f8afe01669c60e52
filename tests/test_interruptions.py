"""A run stopped at any moment (kill -9, SIGINT, SIGTERM, also in the middle of a save) continues when the same
command is run again, and ends with the weights of an uninterrupted run."""

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file

from ipu_trainer.training.checkpoints import COMPLETION_MARKER, list_checkpoints
from ipu_trainer.training.run_record import RunRecord

pytestmark = pytest.mark.slow  # several processes or full runs: left out by -m "not slow"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 60
TINY_BERT = ("vocab_size=2000,hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64,"
             "max_position_embeddings=64")
ONE_CPU = "layers_per_ipu=[-1],ipus_per_replica=1,replication_factor=1,gradient_accumulation_steps=2"


@pytest.fixture(scope="module")
def dataset_path(tmp_path_factory):
    """Pre-built sentence pairs (random tokens), so each run starts fast."""
    generator = torch.Generator().manual_seed(0)
    n, length = 256, 32
    input_ids = torch.randint(5, 2000, (n, length), generator=generator)
    input_ids[:, 0], input_ids[:, length // 2], input_ids[:, -1] = 2, 3, 3
    rows = {"input_ids": input_ids.tolist(), "attention_mask": [[1] * length] * n,
            "token_type_ids": [[0] * (length // 2) + [1] * (length - length // 2)] * n,
            "next_sentence_label": torch.randint(0, 2, (n,), generator=generator).tolist()}
    path = tmp_path_factory.mktemp("pairs") / "data"
    DatasetDict({"train": Dataset.from_dict(rows)}).save_to_disk(str(path))
    return str(path)


def command(dataset_path, tokenizer_dir, output_dir):
    return [
        sys.executable, os.path.join(REPO, "run_pretraining.py"), "--model_type", "bert", "--config_overrides",
        TINY_BERT, "--tokenizer_name", tokenizer_dir, "--dataset_path", dataset_path, "--is_already_preprocessed",
        "--ipu_config_name", REPO, "--ipu_config_overrides", ONE_CPU + ",recompute_checkpoint_every_layer=false",
        "--per_device_train_batch_size", "4", "--max_steps", str(STEPS), "--save_steps", "1", "--logging_steps", "1",
        "--learning_rate", "1e-3", "--fp32", "--seed", "3", "--do_train", "--output_dir", str(output_dir),
        "--report_to", "none", "--disable_tqdm", "true",
    ]


def start(cmd):
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def saving_now(output_dir):
    """A checkpoint folder exists whose completion marker is not written yet: a save is in progress."""
    return any(not os.path.exists(os.path.join(path, COMPLETION_MARKER)) for path in list_checkpoints(str(output_dir)))


def newest_step(output_dir):
    checkpoints = list_checkpoints(str(output_dir))
    return int(checkpoints[0].rsplit("-", 1)[1]) if checkpoints else 0


def interrupt(cmd, output_dir, how, rng):
    """Start the run, wait until it has saved a checkpoint of its own (so it is training), then stop it `how`: at
    a random moment, or the moment a save is seen in progress."""
    before = newest_step(output_dir)
    process = start(cmd)
    deadline = time.monotonic() + 120
    while newest_step(output_dir) <= before and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if how == "kill -9 during a save":
        while not saving_now(output_dir) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
    else:
        time.sleep(rng.uniform(0.0, 0.2))
    number = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}.get(how, signal.SIGKILL)
    if process.poll() is None:
        process.send_signal(number)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def final_weights(output_dir):
    return load_file(os.path.join(str(output_dir), "model.safetensors"))


def test_runs_stopped_at_any_moment_resume_to_the_uninterrupted_weights(dataset_path, tokenizer_dir, tmp_path):
    reference = tmp_path / "reference"
    assert subprocess.run(command(dataset_path, tokenizer_dir, reference), cwd=REPO, capture_output=True).returncode == 0
    expected = final_weights(reference)

    out = tmp_path / "interrupted"
    cmd = command(dataset_path, tokenizer_dir, out)
    rng = random.Random(0)
    clean_stops = 0
    for how in ("kill -9 during a save", "SIGTERM", "kill -9", "SIGINT"):
        code, err = interrupt(cmd, out, how, rng)
        if how in ("SIGTERM", "SIGINT") and code == 128 + (signal.SIGTERM if how == "SIGTERM" else signal.SIGINT):
            # Caught during training: the step was finished, a checkpoint saved, and one line says so.
            last = err.strip().splitlines()[-1]
            assert last.startswith(f"interrupted by {how} at step") and "the same command resumes from it" in last
            assert last.endswith(shlex.join(["python", *cmd[1:]]))  # the command itself, to copy
            clean_stops += 1
        elif code == 0:
            break  # the run finished before the signal landed; the rest is checked below
        else:
            # Killed outright, or a signal that landed outside the training loop (start-up, the final save).
            assert code != 2, err
        if how == "kill -9 during a save":
            assert saving_now(out)  # the kill left a checkpoint without its completion marker
    assert clean_stops >= 1
    finished = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)  # the same command, unchanged
    assert finished.returncode == 0, finished.stderr
    for name, value in final_weights(out).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)

    # Run once more: it is finished, says so, and changes nothing.
    files = {name: (out / name).read_bytes() for name in os.listdir(out) if (out / name).is_file()}
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0 and "nothing to do" in again.stderr.strip().splitlines()[-1]
    assert {name: (out / name).read_bytes() for name in files} == files
    assert not (out / f"checkpoint-{STEPS + 1}").exists() and not (out / "run.lock").exists()


def test_a_second_run_on_the_same_output_folder_is_refused(dataset_path, tokenizer_dir, tmp_path):
    out = tmp_path / "busy"
    cmd = [*command(dataset_path, tokenizer_dir, out), "--max_steps", "100000"]  # still training when the second starts
    first = start(cmd)
    try:
        deadline = time.monotonic() + 120
        while not (out / "run.lock").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and lines[-1].startswith("error: --output_dir") and "in use by another run" in lines[-1]
        assert f"process {first.pid}" in lines[-1]
    finally:
        first.kill()
        first.wait()


def unfinished(output_dir):
    record = RunRecord.read(str(output_dir))
    return record is not None and record.finished is None


def stop_with_sigint_after(cmd, output_dir, step):
    """Start the run, wait until a run in training has saved a checkpoint past `step`, press Ctrl-C; the exit code
    and the output."""
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (unfinished(output_dir) and newest_step(output_dir) > step) and process.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    return process.returncode, output


def test_the_same_command_resumes_an_interrupted_rerun_of_a_finished_run(dataset_path, tokenizer_dir, tmp_path):
    """Finish a run; run the same command (with --overwrite_output_dir) again and stop it; run that command
    again and stop it; run it without --overwrite_output_dir: the second run resumes each time and ends with
    its own results, never the first run's, and nothing is deleted."""
    out = tmp_path / "out"
    cmd = [*command(dataset_path, tokenizer_dir, out), "--overwrite_output_dir"]
    assert subprocess.run(cmd, cwd=REPO, capture_output=True).returncode == 0
    first = RunRecord.read(str(out))
    assert first.finished and "model.safetensors" in first.files

    code, output = stop_with_sigint_after(cmd, out, 2)  # the finished run is set aside; the new one stopped
    assert code == 128 + signal.SIGINT, output
    (aside,) = [name for name in os.listdir(out) if name.startswith("overwritten-")]
    assert sorted(os.listdir(out / aside)) == sorted([*first.files, "run.json"] + [f"checkpoint-{s}" for s in range(1, STEPS + 1)])
    second = RunRecord.read(str(out))
    assert second.started_at > first.started_at and second.finished is None
    assert "Training completed" not in output  # it did not complete
    assert not (out / "model.safetensors").exists()  # no results at the top but the second run's, when it ends
    stopped_at = newest_step(out)

    code, output = stop_with_sigint_after(cmd, out, stopped_at)  # the same command again: resumes
    assert code == 128 + signal.SIGINT, output
    assert f"Resuming from {out / f'checkpoint-{stopped_at}'}" in output and "from scratch" not in output
    stopped_at = newest_step(out)

    plain = [arg for arg in cmd if arg != "--overwrite_output_dir"]
    result = subprocess.run(plain, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"Resuming from {out / f'checkpoint-{stopped_at}'}" in result.stdout
    ended = RunRecord.read(str(out))
    assert ended.started_at == second.started_at and ended.finished and "model.safetensors" in ended.files
    assert read_state(out)["global_step"] == STEPS
    # The same command and seed: the second run ends with the first run's weights, bit for bit.
    first_weights = load_file(str(out / aside / "model.safetensors"))
    for name, value in final_weights(out).items():
        torch.testing.assert_close(value, first_weights[name], rtol=0, atol=0, msg=name)


def read_state(output_dir):
    with open(os.path.join(str(output_dir), "trainer_state.json")) as handle:
        return json.load(handle)
