#!/usr/bin/env python
"""Benchmark: a pipelined training step (`--pipeline`, 2 stages on 2 gloo processes) against the unpipelined one, with
the bubble fraction the schedule predicts.

Every run trains the same BERT (`--layers` layers of width 256, sequence length 128, masked pairs made here) with
`run_pretraining.py` for `--steps` steps of one weight update each: micro batch `--micro-batch`, `--accumulation`
micro-batches per update, one thread per process (torchrun's default), float32, SGD. The runs:

- `1 process`: the unpipelined step in one process: the work of a step on one core;
- `2 processes, data parallel`: the unpipelined step over 2 processes (each half the micro-batches, one all-reduce);
- `2 stages, 1F1B` and `2 stages, GPipe`: `--pipeline` with `layers_per_ipu=[L/2 L/2]`.

Step time: the median of the logged steps' time (samples per step / the logged samples_per_second), the first step
(warm-up, the schedule's shape inference) left out. `efficiency` is the 1-process step time over (processes x step
time): 1 for a perfect split of the work. With P equal stages and m micro-batches the schedules predict a bubble of
(P - 1) / (m + P - 1) of each stage's time, so a pipelined efficiency of at most 1 - bubble (before the cost of
sending activations and the unequal stages: the first holds the embeddings, the last the heads).

    python bench/pipeline.py [--layers 4] [--accumulation 4 16] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ipu_trainer.run.pipeline_layout import bubble_fraction  # noqa: E402

SEQ = 128
VOCAB = 2000


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def make_assets(folder: str, rows: int) -> tuple[str, str]:
    """Masked sentence pairs of SEQ random tokens (15% labelled) saved to disk, and a WordPiece tokenizer."""
    import torch
    from datasets import Dataset

    from ipu_trainer.cli.offline_assets import english_text_documents, train_wordpiece_tokenizer

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, VOCAB, (rows, SEQ), generator=generator)
    labels = torch.where(torch.rand(rows, SEQ, generator=generator) < 0.15, input_ids, torch.tensor(-100))
    data = os.path.join(folder, "data")
    Dataset.from_dict({
        "input_ids": input_ids.tolist(), "attention_mask": torch.ones(rows, SEQ, dtype=torch.long).tolist(),
        "token_type_ids": torch.zeros(rows, SEQ, dtype=torch.long).tolist(), "labels": labels.tolist(),
        "next_sentence_label": torch.randint(0, 2, (rows,), generator=generator).tolist(),
    }).save_to_disk(data)
    tokenizer = os.path.join(folder, "tokenizer")
    train_wordpiece_tokenizer(english_text_documents()[:50], tokenizer)
    return data, tokenizer


def run(name: str, processes: int, pipeline: str | None, options: argparse.Namespace, accumulation: int,
        data: str, tokenizer: str, folder: str) -> dict:
    half = options.layers // 2
    placement = (f"layers_per_ipu=[{half} {options.layers - half}],ipus_per_replica=2" if pipeline else
                 "layers_per_ipu=[-1],ipus_per_replica=1")
    output = os.path.join(folder, f"{name.replace(' ', '_').replace(',', '')}-{accumulation}")
    command = [
        os.path.join(REPO, "run_pretraining.py"), "--model_type", "bert", "--config_overrides",
        f"vocab_size={VOCAB},hidden_size=256,num_hidden_layers={options.layers},num_attention_heads=4,"
        f"intermediate_size=1024,max_position_embeddings={SEQ}", "--tokenizer_name", tokenizer, "--dataset_path", data,
        "--is_already_preprocessed", "--is_already_masked", "--ipu_config_name", REPO, "--ipu_config_overrides",
        f"{placement},replication_factor=1,gradient_accumulation_steps={accumulation},replicated_tensor_sharding=false,"
        "optimizer_state_offchip=false,recompute_checkpoint_every_layer=false",
        "--per_device_train_batch_size", str(options.micro_batch), "--optim", "sgd", "--learning_rate", "0.01",
        "--max_steps", str(options.steps), "--do_train", "--save_strategy", "no", "--logging_steps", "1",
        "--output_dir", output, "--overwrite_output_dir", "--report_to", "none", "--disable_tqdm", "true", "--fp32",
        "--seed", "0",
    ]
    if pipeline:
        command += ["--pipeline", pipeline]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    result = subprocess.run(launcher + command, capture_output=True, text=True, cwd=REPO, env=environment)
    if result.returncode:
        raise RuntimeError(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    with open(os.path.join(output, "trainer_state.json")) as handle:
        history = json.load(handle)["log_history"]
    samples = options.micro_batch * accumulation
    times = [samples / entry["samples_per_second"] for entry in history if "samples_per_second" in entry]
    return {"name": name, "processes": processes, "accumulation": accumulation, "step_seconds": statistics.median(times),
            "steps_timed": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--steps", type=int, default=8)
    options = parser.parse_args()
    rows = options.micro_batch * max(options.accumulation) * (options.steps + 2) + 64
    started = time.time()
    with tempfile.TemporaryDirectory() as folder:
        data, tokenizer = make_assets(folder, rows)
        results = []
        for accumulation in options.accumulation:
            for name, processes, pipeline in (("1 process", 1, None), ("2 processes, data parallel", 2, None),
                                              ("2 stages, 1F1B", 2, "1F1B"), ("2 stages, GPipe", 2, "GPipe")):
                results.append(run(name, processes, pipeline, options, accumulation, data, tokenizer, folder))
    print(f"BERT {options.layers} layers, hidden 256, seq {SEQ}, micro batch {options.micro_batch}, {options.steps} "
          f"steps (first left out), 1 thread per process, gloo; {time.time() - started:.0f} s in all")
    print(f"{'run':28} {'micro-batches':>13} {'step (s)':>9} {'efficiency':>10} {'predicted bubble':>16}")
    for result in results:
        alone = next(r for r in results if r["processes"] == 1 and r["accumulation"] == result["accumulation"])
        efficiency = alone["step_seconds"] / (result["processes"] * result["step_seconds"])
        bubble = (f"{bubble_fraction('1F1B', 2, result['accumulation']):.1%}" if "stages" in result["name"] else "")
        print(f"{result['name']:28} {result['accumulation']:>13} {result['step_seconds']:>9.3f} {efficiency:>10.2f} "
              f"{bubble:>16}")


if __name__ == "__main__":
    main()
