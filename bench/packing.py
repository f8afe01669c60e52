#!/usr/bin/env python
"""Benchmark: packed sequences vs padded ones, this project's path and the stock Trainer, in one run.

Data with a realistic length distribution, from CPython's pydoc text (offline), tokenized with the WordPiece
tokenizer of `bench/pretrain.py` (vocabulary filled to BERT's 30522 with [unusedN] entries):

- `pairs`: BERT sentence pairs from the project's own NSP builder (`build_nsp_pairs`, the published recipe's
  short-sequence probability 0.1), padded to the sequence length as run_pretraining.py trains them.
- `lines`: `run_mlm.py --line_by_line` samples: one sentence per line, tokenized and truncated to the length;
  the padded paths pad each batch to its longest line (dynamic padding, the scripts' default).

Three sides per data kind and length, each in its own subprocess, alternating over `--rounds`:

(a) packed: `IPUTrainer` + the masked-position model + `--packing` (`ipu_trainer.data.packing`); a micro-batch is
    round(B / average sequences per row) packed rows, so a weight update sees about the B sequences of (a0).
(a0) unpacked: the same model, trainer and masking collator on the padded sequences, micro-batch B.
(b) stock: `transformers.Trainer` + `BertForPreTraining` / `BertForMaskedLM` + `DataCollatorForLanguageModeling`
    with its dynamic padding, micro-batch B.

Throughput is in sequences per second (the same sequences on every side), over the steps after the first
`--warmup-steps`: each round's sequences over its step time; the best round is reported (other load only
slows a round down), the mean over rounds next to it. p is the padding fraction that (a0) actually carried
in its timed batches; packing can at best turn it into a speedup of 1/(1-p) over (a0): the table prints
that bound and the fraction of it that (a) achieved, and what the packing itself reaches on the data,
(1 - padding left in the packed rows) / (1 - p): below the bound when many sequences are longer than half
a row, since no two of those share one. The bound assumes all work scales with positions; the ratio of
model FLOPs per sequence shows how much less it can be when part of the work does not (the MLM head at the
masked tokens, the same on both sides). Rates per CPU-second of the side's process are printed too: with
`--threads 1` they count the side's own work whatever else runs on the machine (with several threads, time
spent waiting on each other counts as well, and on a shared machine that grows with the number of small ops).

    python bench/packing.py [--preset cpu|bert-base] [--lengths 128 512] [--kinds pairs lines] [--steps N] [--batch-size B] [--threads T] [--tiny]

The last line is `speedup: X.XXx`: samples/s of (a) over (a0), the lowest over the data kinds and lengths run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pretrain import PRESETS, TINY, build_tokenizer  # noqa: E402

MLM_PROBABILITY = 0.15
SHORT_SEQ_PROB = 0.1  # the published BERT recipe's
LEARNING_RATE = 1e-4
SIDES = ("packed", "unpacked", "stock")
LABELS = {
    "packed": "(a) packed: IPUTrainer + masked-pos. BERT",
    "unpacked": "(a0) padded: IPUTrainer + masked-pos. BERT",
    "stock": "(b) padded: Trainer + upstream BERT",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="model size, as in bench/pretrain.py: cpu (small BERT) or bert-base")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512], help="sequence lengths (max_seq_length)")
    parser.add_argument("--kinds", nargs="+", choices=["pairs", "lines"], default=["pairs", "lines"])
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch of the padded sides")
    parser.add_argument("--steps", type=int, default=8, help="trainer steps per side and round")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per side: a, a0, b, a, a0, b, ...")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int,
                        help="torch threads per side (default: torch's, one per core). On a machine shared with other "
                        "jobs, 1 avoids threads waiting on each other's descheduled partners")
    parser.add_argument("--tiny", action="store_true", help="shrink the model and vocabulary (smoke test)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 0 <= args.warmup_steps < args.steps:
        parser.error(f"--warmup-steps={args.warmup_steps} must be in [0, --steps={args.steps})")
    settings = dict(PRESETS[args.preset])
    if args.tiny:
        settings.update(TINY)
        settings["batch_size"] = min(settings["batch_size"], args.batch_size)
        args.batch_size = settings["batch_size"]
    for key in ("seq_len", "batch_size", "grad_accum", "steps", "warmup_steps", "rounds"):
        settings.pop(key)
    args.model = settings
    return args


# ---- data (the parent) -----------------------------------------------------------------------------

def build_data(kind: str, length: int, tokenizer, num_sequences: int, seed: int):
    """`num_sequences` or more sequences of one kind at one length, as the scripts build them."""
    from datasets import Dataset, DatasetDict, concatenate_datasets

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the scripts' folder
    from run_mlm import tokenize_for_masked_lm
    from ipu_trainer.cli.offline_assets import english_text_topics
    from ipu_trainer.data.nsp_pairs import build_nsp_pairs, split_sentences

    documents = Dataset.from_dict({"text": english_text_topics()})
    if kind == "pairs":
        first = build_nsp_pairs(documents, tokenizer, length, short_seq_prob=SHORT_SEQ_PROB, seed=seed)
        dupe_factor = max(1, math.ceil(num_sequences / len(first)))
        if dupe_factor == 1:
            return first
        return build_nsp_pairs(documents, tokenizer, length, short_seq_prob=SHORT_SEQ_PROB, seed=seed,
                               dupe_factor=dupe_factor)
    lines = [sentence for text in documents["text"] for sentence in split_sentences(text)]
    raw = DatasetDict({"train": Dataset.from_dict({"text": lines})})
    tokenized = tokenize_for_masked_lm(raw, tokenizer, length, line_by_line=True, pad_to_max_length=False)["train"]
    repeats = max(1, math.ceil(num_sequences / len(tokenized)))
    return concatenate_datasets([tokenized] * repeats) if repeats > 1 else tokenized


# ---- one side (runs in a subprocess) ----------------------------------------------------------------

class CountingCollator:
    """Wraps a collator and records, per batch in the order the loop consumes them: sequences, positions
    computed (rows x padded length), real tokens and rows."""

    def __init__(self, collator, packed: bool) -> None:
        self.collator = collator
        self.packed = packed
        self.batches: list[tuple[int, int, int]] = []

    def __call__(self, examples):
        batch = self.collator(examples)
        if self.packed:
            sequences = sum(len(row) for row in examples)
            real = int((batch["sequence_ids"] > 0).sum())
        else:
            sequences = len(examples)
            real = int(batch["attention_mask"].sum())
        self.batches.append((sequences, batch["input_ids"].numel(), real, batch["input_ids"].shape[0]))
        return batch


def run_side(args: argparse.Namespace) -> dict:
    import torch
    from datasets import load_from_disk
    from transformers import (BertConfig, BertForMaskedLM, BertForPreTraining, BertTokenizer,
                              DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments, set_seed)
    from transformers.utils import logging as hf_logging

    from ipu_trainer.data.collators import DataCollatorForLanguageModelingWithMaxTokensMasked, max_num_masked_tokens
    from ipu_trainer.config.ipu_config import IPUConfig
    from ipu_trainer.models import BertForMaskedLMMaskedPositions, BertForPreTrainingMaskedPositions
    from ipu_trainer.data.packing import pack_for_training
    from ipu_trainer.training.trainer import IPUTrainer
    from ipu_trainer.run.training_args import IPUTrainingArguments

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    kind, length = args.kind, args.length
    tokenizer = BertTokenizer.from_pretrained(os.path.dirname(args.data))
    dataset = load_from_disk(args.data)
    cap = max_num_masked_tokens(length, MLM_PROBABILITY)

    set_seed(args.seed)
    config = BertConfig(max_position_embeddings=max(512, length), **args.model)
    if args.side != "stock":
        config.max_num_masked_tokens = cap
    model_class = {
        ("pairs", True): BertForPreTrainingMaskedPositions, ("pairs", False): BertForPreTraining,
        ("lines", True): BertForMaskedLMMaskedPositions, ("lines", False): BertForMaskedLM,
    }[kind, args.side != "stock"]
    model = model_class(config)

    batch_size, packing = args.batch_size, {}
    if args.side == "stock":
        collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=MLM_PROBABILITY, seed=args.seed)
    else:
        collator = DataCollatorForLanguageModelingWithMaxTokensMasked(
            tokenizer=tokenizer, mlm_probability=MLM_PROBABILITY, max_seq_length=length, max_num_masked_tokens=cap,
            seed=args.seed)
    if args.side == "packed":
        dataset, _, collator = pack_for_training(dataset, None, length, tokenizer.pad_token_id, masking=collator,
                                                 max_num_masked_tokens=cap, seed=args.seed)
        plan = dataset.plan
        batch_size = max(1, round(args.batch_size / plan.sequences_per_row))
        packing = {"sequences_per_row": plan.sequences_per_row, "efficiency": plan.efficiency, "rows": batch_size}
    counting = CountingCollator(collator, packed=args.side == "packed")

    common = dict(output_dir=os.path.join(os.path.dirname(args.data), f"out-{args.side}"), max_steps=args.steps,
                  per_device_train_batch_size=batch_size, learning_rate=LEARNING_RATE, seed=args.seed,
                  logging_steps=args.steps, save_strategy="no", report_to=[], disable_tqdm=True,
                  dataloader_num_workers=0)
    stamps: dict[int, float] = {}
    cpu_stamps: dict[int, float] = {}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, _args, state, _control, **kwargs):
            stamps[0], cpu_stamps[0] = time.perf_counter(), time.process_time()

        def on_step_end(self, _args, state, _control, **kwargs):
            if state.global_step >= args.warmup_steps:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                stamps[state.global_step], cpu_stamps[state.global_step] = time.perf_counter(), time.process_time()

    if args.side == "stock":
        trainer = Trainer(model=model, args=TrainingArguments(**common, bf16=torch.cuda.is_available()),
                          data_collator=counting, train_dataset=dataset, callbacks=[StepTimer()])
    else:
        trainer = IPUTrainer(model=model, ipu_config=IPUConfig(),
                             args=IPUTrainingArguments(**common, fp32=not torch.cuda.is_available()),
                             data_collator=counting, train_dataset=dataset, callbacks=[StepTimer()])
    result = trainer.train()

    # Timed steps are warmup+1 .. steps; step i consumed the i-th batch collated (the loop may collate one ahead).
    timed = counting.batches[args.warmup_steps : args.steps]
    return {
        "side": args.side,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads",
        "step_seconds": [stamps[i] - stamps[i - 1] for i in range(args.warmup_steps + 1, args.steps + 1)],
        "cpu_seconds": [cpu_stamps[i] - cpu_stamps[i - 1] for i in range(args.warmup_steps + 1, args.steps + 1)],
        "sequences": [b[0] for b in timed],
        "positions": sum(b[1] for b in timed),
        "real_tokens": sum(b[2] for b in timed),
        "attended_positions": sum(b[1] * b[1] / b[3] for b in timed),  # rows x length^2 summed over batches
        "batch_size": batch_size,
        "train_loss": result.training_loss,
        **packing,
    }


# ---- the parent: data once, subprocesses, the table -------------------------------------------------

def run_subprocess(args: argparse.Namespace, side: str, kind: str, length: int, data: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--side", side, "--data", data, "--kind", kind,
               "--length", str(length), "--steps", str(args.steps),
               "--warmup-steps", str(args.warmup_steps), "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    command += ["--preset", args.preset] + (["--tiny"] if args.tiny else [])
    command += ["--threads", str(args.threads)] if args.threads else []
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise RuntimeError(f"side {side} on {kind} at {length} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    """One side's rounds -> its row: sequences/s of the best round and the mean over rounds."""
    rates = [sum(run["sequences"]) / sum(run["step_seconds"]) for run in runs]
    row = dict(runs[0])
    row["samples_per_s"] = max(rates)
    row["mean_samples_per_s"] = sum(sum(r["sequences"]) for r in runs) / sum(sum(r["step_seconds"]) for r in runs)
    row["padding"] = 1 - sum(r["real_tokens"] for r in runs) / sum(r["positions"] for r in runs)
    # CPU time of the process (all its threads): what the side itself computed, less sensitive to other load.
    row["samples_per_cpu_s"] = max(sum(run["sequences"]) / sum(run["cpu_seconds"]) for run in runs)
    # Real tokens/s: over a short run the sampled rows hold longer or shorter sequences by chance, which moves
    # sequences/s but not tokens/s (over a whole epoch both sides train the same sequences, and the two agree).
    row["tokens_per_s"] = max(run["real_tokens"] / sum(run["step_seconds"]) for run in runs)
    for key in ("sequences", "positions", "real_tokens", "attended_positions"):
        row[f"total_{key}"] = sum(sum(r[key]) if isinstance(r[key], list) else r[key] for r in runs)
    return row


def model_flops_per_sequence(model: dict, row: dict) -> float:
    """Training FLOPs (3 x forward) per sequence of a side: encoder matmuls at every computed position,
    attention over each row's length, and the MLM head (transform + vocabulary projection) at the masked
    tokens only (MLM_PROBABILITY of the real ones), as this project's masked-position models compute it."""
    h, layers, inter, vocab = (model[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))
    dense = 6 * layers * (4 * h * h + 2 * h * inter) * row["total_positions"]
    attention = 12 * layers * h * row["total_attended_positions"]
    head = 6 * (h * h + h * vocab) * MLM_PROBABILITY * row["total_real_tokens"]
    return (dense + attention + head) / row["total_sequences"]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side:
        print(json.dumps(run_side(args)))
        return 0

    load = os.getloadavg()
    m = args.model
    print(f"model ({args.preset} preset): hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, {m['num_attention_heads']} heads, "
          f"intermediate {m['intermediate_size']}, vocab {m['vocab_size']}{' (tiny)' if args.tiny else ''}; "
          f"padded micro-batch {args.batch_size} sequences; {args.rounds} x {args.steps} steps per side, "
          f"first {args.warmup_steps} untimed; load average at start {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    speedups = []
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as folder:
        tokenizer = build_tokenizer(folder, args.model["vocab_size"])
        for kind in args.kinds:
            for length in args.lengths:
                data = os.path.join(folder, f"{kind}-{length}")
                needed = (args.steps + 1) * args.batch_size
                build_data(kind, length, tokenizer, needed, args.seed).save_to_disk(data)
                runs: dict[str, list[dict]] = {side: [] for side in SIDES}
                for _ in range(args.rounds):
                    for side in SIDES:
                        runs[side].append(run_subprocess(args, side, kind, length, data))
                rows = {side: summarize(side_runs) for side, side_runs in runs.items()}
                speedups.append(report(kind, length, rows, args.model))
    print(f"load average at end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"speedup: {min(speedups):.2f}x")
    return 0


def report(kind: str, length: int, rows: dict[str, dict], model: dict) -> float:
    packed, unpacked, stock = rows["packed"], rows["unpacked"], rows["stock"]
    p = unpacked["padding"]
    bound = 1 / (1 - p)
    speedup = packed["samples_per_s"] / unpacked["samples_per_s"]
    cpu_speedup = packed["samples_per_cpu_s"] / unpacked["samples_per_cpu_s"]
    print()
    print(f"{kind} at {length} ({packed['device']}): padding carried by (a0) p = {p:.1%}, bound 1/(1-p) = {bound:.2f}x; "
          f"packing {packed['sequences_per_row']:.2f} sequences per row, efficiency {packed['efficiency']:.1%}, "
          f"micro-batch {packed['rows']} rows")
    print(f"{'side':<46} {'seq/s':>8} {'(mean)':>8} {'seq/CPU-s':>10} {'tokens/s':>9} {'padding':>8} {'micro-batch':>12}")
    for side, row in rows.items():
        print(f"{LABELS[side]:<46} {row['samples_per_s']:>8.1f} {row['mean_samples_per_s']:>8.1f} "
              f"{row['samples_per_cpu_s']:>10.1f} {row['tokens_per_s']:>9.0f} {row['padding']:>8.1%} {row['batch_size']:>12}")
    # What packing can deliver on this data: sequences per computed position, packed over padded. Below the
    # bound when sequences longer than half a row cannot share one (any packing leaves their gaps).
    reachable = (1 - packed["padding"]) / (1 - p)
    # And in model FLOPs: work that does not shrink with padding (the MLM head at the masked tokens) lowers it.
    flops = model_flops_per_sequence(model, unpacked) / model_flops_per_sequence(model, packed)
    print(f"packing reaches {reachable:.2f}x of the bound's {bound:.2f}x on this data (padding left in packed rows "
          f"{packed['padding']:.1%}); model FLOPs per sequence (a0) / (a): {flops:.2f}x")
    print(f"(a) over (a0): {speedup:.2f}x = {speedup / bound:.0%} of the bound ({speedup / reachable:.0%} of what "
          f"the packing reaches, {speedup / flops:.0%} of the FLOPs ratio); in CPU time {cpu_speedup:.2f}x; in real tokens/s "
          f"{packed['tokens_per_s'] / unpacked['tokens_per_s']:.2f}x = "
          f"{packed['tokens_per_s'] / unpacked['tokens_per_s'] / bound:.0%} of the bound; (a) over (b): "
          f"{packed['samples_per_s'] / stock['samples_per_s']:.2f}x; (a0) over (b): "
          f"{unpacked['samples_per_s'] / stock['samples_per_s']:.2f}x")
    return speedup

if __name__ == "__main__":
    sys.exit(main())
