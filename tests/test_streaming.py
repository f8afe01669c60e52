"""--streaming in the three scripts, on local files: each step trains on the next rows of the stream, exactly the rows
the same preprocessing gives without streaming; several processes share each step's rows; a resumed run ends with
the weights of an uninterrupted one."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, free_port, quickstart_argv, script_module
from datasets import load_dataset
from safetensors.torch import load_file
from transformers import AutoTokenizer

from ipu_trainer import IPUTrainer
from ipu_trainer.cli.startup import run_cli
from ipu_trainer.data.nsp_pairs import build_nsp_pairs, load_text_documents

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "streaming_worker.py")
SAMPLES_PER_STEP = 16  # quickstart_argv: micro 8 x accumulation 2
TRAINING_STEP = IPUTrainer.training_step


def unmasked(step: dict) -> list[list[int]]:
    """The rows of a step's batch before masking: the label where a position was masked, else the input id."""
    if "labels" not in step or step["labels"] == step["input_ids"]:  # causal LM: labels are the inputs
        return step["input_ids"]
    return [[label if label != -100 else token for token, label in zip(ids, labels)]
            for ids, labels in zip(step["input_ids"], step["labels"])]


def preprocessed_rows(script: str, assets: dict, line_by_line: bool = False) -> list[list[int]]:
    """The training file's samples as the script preprocesses them without --streaming, in order (no shuffling)."""
    if script == "run_clm":
        raw = load_dataset("text", data_files={"train": assets["train_file"]}, keep_linebreaks=True)
        rows = script_module("run_clm").tokenize_for_causal_lm(raw, AutoTokenizer.from_pretrained(assets["bpe_tokenizer"]), 64)["train"]
    elif script == "run_mlm":
        raw = load_dataset("text", data_files={"train": assets["train_file"]})
        tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
        rows = script_module("run_mlm").tokenize_for_masked_lm(raw, tokenizer, 64, line_by_line, pad_to_max_length=line_by_line)["train"]
    else:  # fewer documents than one block of DOCUMENTS_PER_BLOCK: the stream's pairs are the same
        documents = load_text_documents({"train": assets["train_file"]})["train"]
        rows = build_nsp_pairs(documents, AutoTokenizer.from_pretrained(assets["tokenizer"]), 64, seed=7)
    return [list(ids) for ids in rows["input_ids"]]


def run_recording(monkeypatch, argv) -> list[dict]:
    """Run the script of `argv` in-process; the batch of each training step."""
    steps = []

    def recording_step(self, model, inputs, num_items_in_batch=None):
        steps.append({key: inputs[key].tolist() for key in ("input_ids", "labels") if key in inputs})
        return TRAINING_STEP(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(IPUTrainer, "training_step", recording_step)
    monkeypatch.setattr(sys, "argv", argv)
    assert run_cli(script_module(argv[0][:-3]).main) == 0
    return steps


def results(output_dir) -> dict:
    with open(os.path.join(output_dir, "all_results.json")) as handle:
        return json.load(handle)


@pytest.mark.parametrize("script, held_out", [("run_clm", False), ("run_mlm", True), ("run_pretraining", False)])
def test_each_step_trains_on_the_next_rows_of_the_stream(script, held_out, assets, tmp_path, monkeypatch):
    argv = quickstart_argv(script, assets, tmp_path / "out", "--streaming", "--do_eval")
    if held_out:  # no validation data: the first --max_eval_samples (16) samples are evaluated, not trained on
        index = argv.index("--validation_file")
        del argv[index:index + 2]
    steps = run_recording(monkeypatch, argv)

    expected = preprocessed_rows(script, assets)
    start = 16 if held_out else 0
    assert [unmasked(step) for step in steps] == [expected[start:start + 16], expected[start + 16:start + 32]]
    assert results(tmp_path / "out")["train_samples"] == 2 * SAMPLES_PER_STEP  # steps x samples per step
    assert results(tmp_path / "out")["eval_samples"] == 16


@pytest.mark.slow
def test_two_processes_share_each_step_of_the_stream_without_overlap_or_loss(assets, tmp_path):
    """torchrun, 2 processes (gloo): the first reads both processes' batches of a step and hands each its half. With
    --line_by_line the lines are padded to max_seq_length, so that both batches have one shape."""
    argv = quickstart_argv("run_mlm", assets, tmp_path / "out", "--streaming", "--line_by_line")[1:]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), WORKER, str(tmp_path), "run_mlm", *argv]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{rank}.json")) for rank in (0, 1)]
    assert [rank["code"] for rank in ranks] == [0, 0] and [len(rank["steps"]) for rank in ranks] == [2, 2]
    # run_cli's teardown joined the gloo threads (None: this system does not list threads in /proc)
    assert all(rank["gloo_threads_after_run_cli"] in ([], None) for rank in ranks)

    expected = preprocessed_rows("run_mlm", assets, line_by_line=True)
    for step in range(2):
        halves = [unmasked(rank["steps"][step]) for rank in ranks]
        assert [len(half) for half in halves] == [8, 8]
        assert halves[0] + halves[1] == expected[step * 16:(step + 1) * 16]


def test_a_resumed_streaming_run_ends_with_the_weights_of_an_uninterrupted_one(assets, tmp_path, monkeypatch, caplog):
    """24 training samples and 16 per step: the stream starts again in the middle of step 2 (every step keeps its 16
    samples), and the run resumed from checkpoint-3 skips the 3 step batches trained before it, across that restart."""
    def argv(output_dir):
        command = quickstart_argv("run_clm", assets, output_dir, "--streaming", "--max_train_samples", "24",
                                  "--save_strategy", "steps", "--save_steps", "3", "--lr_scheduler_type", "linear")
        command[command.index("--max_steps") + 1] = "4"
        command.remove("--overwrite_output_dir")
        return command

    straight = tmp_path / "straight"
    straight_steps = run_recording(monkeypatch, argv(straight))
    samples = preprocessed_rows("run_clm", assets)[:24]
    assert [row for step in straight_steps for row in step["input_ids"]] == (samples * 3)[:4 * SAMPLES_PER_STEP]

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    with caplog.at_level("INFO", logger="ipu_trainer"):
        resumed_steps = run_recording(monkeypatch, argv(resumed))  # finds checkpoint-3 and resumes from it
    assert resumed_steps == straight_steps[3:]
    expected, actual = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any("the stream is read again from its start and the 3 step batches already trained on (48 samples) are "
               "skipped" in record.getMessage() for record in caplog.records)


def test_a_stream_is_checked_from_its_first_rows(tmp_path):
    """What is checked of a stream before training: its text column by the first row, the UTF-8 of a local file by
    its beginning only (the rest is read with replacement characters when it is trained on)."""
    from datasets import load_dataset

    from ipu_trainer.cli.datasets import text_column_of
    from ipu_trainer.data.sources import check_text_file

    numbers = tmp_path / "numbers.csv"
    numbers.write_text("a,b\n" + "1,x\n" * 3)
    stream = load_dataset("csv", data_files=str(numbers), streaming=True)["train"]
    assert stream.features is None  # known once read
    with pytest.raises(ValueError, match="numbers.csv has no 'text' column, and its first column 'a' holds int"):
        text_column_of(stream, "--train_file numbers.csv")

    late_latin1 = tmp_path / "late.txt"
    late_latin1.write_bytes(b"plain text line\n" * (1 << 17) + "Caf\xe9.\n".encode("latin-1"))  # 2 MiB, then a bad byte
    assert check_text_file(str(late_latin1), "--train_file late.txt", max_bytes=1 << 20)
    assert not check_text_file(str(late_latin1), "--train_file late.txt")
