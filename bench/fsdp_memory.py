#!/usr/bin/env python
"""Benchmark: memory per process with --fsdp (FSDP2 full_shard) against plain replicas (DDP), 2 gloo processes.

Each side trains a GPT-2 (`--layers`, `--width`, `--vocab`: about 25 M parameters by default) for `--steps` steps
with IPUTrainer, the original's AdamW (two moments per parameter), replicas 2 x accumulation 2, float32, on the
CPU under `torchrun --nproc_per_node 2`. Each process reports:

- model state: the bytes of parameters, gradients and optimizer state it holds after the last step (its local
  shards under FSDP), the part FSDP divides by the number of processes W;
- peak RSS: the process's peak resident memory (getrusage), which also holds torch itself, activations and
  the all-gathered layers of the moment.

Run: `python bench/fsdp_memory.py` (launches both sides and prints a markdown table row per side).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def local_bytes(tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def worker(options) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, default_data_collator

    sys.path.insert(0, REPO)
    from ipu_trainer import IPUConfig, IPUTrainer, IPUTrainingArguments
    from ipu_trainer.cli.startup import end_distributed

    config = GPT2Config(vocab_size=options.vocab, n_embd=options.width, n_layer=options.layers, n_head=8,
                        n_positions=options.seq, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, options.vocab, (64, options.seq))
    data = [{"input_ids": row, "labels": row} for row in ids]
    ipu_config = IPUConfig(layers_per_ipu=[-1], replication_factor=2, gradient_accumulation_steps=2)
    args = IPUTrainingArguments(
        output_dir=options.output_dir, per_device_train_batch_size=1, max_steps=options.steps, fp32=True,
        report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
        **({"fsdp": "full_shard"} if options.side == "fsdp" else {}),
    )
    trainer = IPUTrainer(model=model, ipu_config=ipu_config, args=args, data_collator=default_data_collator,
                         train_dataset=data)
    trainer.train()
    params = sum(local_bytes(p) for p in trainer.model.parameters())
    grads = sum(local_bytes(p.grad) for p in trainer.model.parameters() if p.grad is not None)
    optimizer = trainer.optimizer
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    state = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0)
    report = {"side": options.side, "rank": trainer.args.process_index, "parameters": params, "gradients": grads,
              "optimizer_state": state, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "model_parameters": sum(p.numel() for p in model.parameters())}
    with open(os.path.join(options.output_dir, f"{options.side}-rank{report['rank']}.json"), "w") as handle:
        json.dump(report, handle)
    end_distributed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--output_dir", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    options = parser.parse_args()
    if options.side:
        worker(options)
        return
    folder = tempfile.mkdtemp(prefix="fsdp_memory_")
    for side in ("ddp", "fsdp"):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), os.path.abspath(__file__), "--side", side,
                   "--output_dir", folder, "--layers", str(options.layers), "--width", str(options.width),
                   "--vocab", str(options.vocab), "--seq", str(options.seq), "--steps", str(options.steps)]
        subprocess.run(command, check=True, cwd=REPO, capture_output=True)
    print("| side | process | parameters | gradients | optimizer state | model state total | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for side in ("ddp", "fsdp"):
        for rank in (0, 1):
            with open(os.path.join(folder, f"{side}-rank{rank}.json")) as handle:
                r = json.load(handle)
            total = r["parameters"] + r["gradients"] + r["optimizer_state"]
            print(f"| {side} | {rank} | {r['parameters'] / 1e6:.1f} MB | {r['gradients'] / 1e6:.1f} MB | "
                  f"{r['optimizer_state'] / 1e6:.1f} MB | {total / 1e6:.1f} MB | {r['peak_rss'] / 1e6:.0f} MB |")
    print(f"model: {r['model_parameters'] / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
