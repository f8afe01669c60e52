#!/usr/bin/env python
"""Benchmark: BERT pretraining steps, this project's path vs the stock transformers path, in one run.

Both sides train the same BERT config for the same steps on the same batches, precision and seed:

(a) `IPUTrainer` + `BertForPreTrainingMaskedPositions` (MLM logits only at the masked positions: a
    static max_num_masked_tokens per row on GPU, exactly the labelled ones packed on CPU; `--static-k`
    forces the static gather) + `DataCollatorForLanguageModelingWithMaxTokensMasked`, the original's
    optimizer (AdamW without bias correction, on torch's fused kernel, no clipping; `--lamb` switches side
    (a) to our foreach LAMB).
(b) the baseline a user would pick instead: `transformers.Trainer` + `BertForPreTraining` +
    `DataCollatorForLanguageModeling`, the Trainer's default fused AdamW (clipped at norm 1).

Data: English text (CPython's pydoc topics) tokenized with an uncased WordPiece tokenizer trained offline
(`ipu_trainer.cli.offline_assets`). The corpus only yields a few thousand word pieces, so the vocabulary is
filled up to the preset's vocab_size (30522, BERT's) with `[unusedN]` entries as in BERT's own vocab: the MLM head
costs what it costs in real BERT, and random-token replacement draws from the whole vocabulary. The text
is packed into full rows of the preset's seq_len `[CLS] A [SEP] B [SEP]` with B the true continuation or (half of the
time) a span from another row, so NSP is trained too. Rows are packed: the padding fraction is printed.

Each side runs in its own subprocess (this script with `--side a|b`, one JSON line on stdout), so its
peak memory is its own: peak RSS (and its rise over the process before the model was built) on CPU,
`torch.cuda.max_memory_allocated` on GPU. Timing: the wall time of each step after the first `--warmup-steps`,
over `--rounds` alternating runs (a, b, a, b); samples/s is taken from the fastest step (other load only
slows steps down), the mean over all timed steps is printed next to it. On CUDA the run is bf16 autocast on both sides and the table adds model FLOP
utilisation: useful FLOPs per sequence (see `model_flops_per_sequence`) x samples/s over the GPU's datasheet dense peak
for the dtype the matmuls ran in (`ipu_trainer.training.mfu`; the peak used is printed, "n/a" for a GPU not in its table).

    python bench/pretrain.py --preset cpu|bert-base [--steps N] [--warmup-steps K] [--batch-size B]

The last line is `speedup: X.XXx`, samples/s of (a) over (b).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

PRESETS = {
    # A small BERT that fits 2 CPU cores in about a minute per side.
    "cpu": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                vocab_size=30522, seq_len=128, batch_size=16, grad_accum=1, steps=10, warmup_steps=2, rounds=2),
    # BERT-base, phase-1 shape (seq 128, micro-batch 32), for a GPU; 16 micro-batches per step.
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      vocab_size=30522, seq_len=128, batch_size=32, grad_accum=16, steps=40, warmup_steps=10,
                      rounds=1),
}
# --tiny shrinks any preset to seconds, for the smoke test.
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=4096,
            batch_size=4, grad_accum=1, rounds=1)
MLM_PROBABILITY = 0.15
LEARNING_RATE = 1e-4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, help="total trainer steps per side (preset default)")
    parser.add_argument("--warmup-steps", type=int, help="steps left out of the timing (preset default)")
    parser.add_argument("--batch-size", type=int, help="micro-batch size (preset default)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per step (= per weight update)")
    parser.add_argument("--rounds", type=int, help="alternating runs per side: a, b, a, b, ... (preset default)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--lamb", action="store_true", help="side (a) uses LAMB instead of AdamW")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    parser.add_argument("--tiny", action="store_true", help="shrink the model and vocabulary (smoke test)")
    parser.add_argument("--static-k", action="store_true",
                        help="side (a) gathers a static max_num_masked_tokens per row in training, as on "
                        "accelerators, instead of packing the labelled positions (CPU default); for A/B runs")
    parser.add_argument("--side", choices=["a", "b"], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = dict(PRESETS[args.preset])
    if args.tiny:
        settings.update(TINY)
    for key in ("steps", "warmup_steps", "batch_size", "grad_accum", "rounds"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
        setattr(args, key, settings.pop(key))
    if not 0 <= args.warmup_steps < args.steps:
        parser.error(f"--warmup-steps={args.warmup_steps} must be in [0, --steps={args.steps})")
    args.model = settings
    return args


# ---- data ------------------------------------------------------------------------------------------

def build_tokenizer(output_dir: str, vocab_size: int):
    """WordPiece trained on the pydoc text, its vocab filled up to `vocab_size` with [unusedN] entries."""
    from transformers import BertTokenizer

    from ipu_trainer.cli.offline_assets import english_text_documents, train_wordpiece_tokenizer

    train_wordpiece_tokenizer(english_text_documents(), output_dir, vocab_size=vocab_size)
    vocab_path = os.path.join(output_dir, "vocab.txt")
    with open(vocab_path, encoding="utf-8") as f:
        vocab = f.read().splitlines()
    if len(vocab) > vocab_size:
        raise ValueError(f"the trained vocabulary ({len(vocab)}) exceeds --vocab-size {vocab_size}")
    vocab += [f"[unused{i}]" for i in range(vocab_size - len(vocab))]
    with open(vocab_path, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab=vocab_path, model_max_length=512)
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def build_rows(tokenizer, seq_len: int, num_rows: int, seed: int) -> dict[str, list]:
    """`num_rows` packed sentence-pair rows of exactly `seq_len` tokens, with NSP labels (1 = random B)."""
    from ipu_trainer.cli.offline_assets import english_text_documents

    ids = [i for doc in tokenizer(english_text_documents(), add_special_tokens=False, verbose=False)["input_ids"] for i in doc]
    content = seq_len - 3
    blocks = [ids[start : start + content] for start in range(0, len(ids) - content + 1, content)]
    rng = random.Random(seed)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    rows = {"input_ids": [], "token_type_ids": [], "attention_mask": [], "special_tokens_mask": [],
            "next_sentence_label": []}
    for n in range(num_rows):
        block = blocks[n % len(blocks)]
        cut = rng.randint(content // 4, 3 * content // 4)
        first, second = block[:cut], block[cut:]
        is_random = rng.random() < 0.5
        if is_random:
            other = blocks[rng.randrange(len(blocks))]
            second = other[rng.randrange(len(other) - len(second) + 1):][: len(second)]
        input_ids = [cls] + first + [sep] + second + [sep]
        rows["input_ids"].append(input_ids)
        rows["token_type_ids"].append([0] * (len(first) + 2) + [1] * (len(second) + 1))
        rows["attention_mask"].append([1] * seq_len)
        rows["special_tokens_mask"].append([1] + [0] * len(first) + [1] + [0] * len(second) + [1])
        rows["next_sentence_label"].append(int(is_random))
    return rows


class RowsDataset:
    """Map-style dataset over the column lists written by the parent."""

    def __init__(self, rows: dict[str, list]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows["input_ids"])

    def __getitem__(self, index: int) -> dict:
        return {key: column[index] for key, column in self.rows.items()}


def padding_fraction(rows: dict[str, list]) -> float:
    total = sum(len(mask) for mask in rows["attention_mask"])
    return 1.0 - sum(sum(mask) for mask in rows["attention_mask"]) / total


# ---- FLOPs -----------------------------------------------------------------------------------------

def model_flops_per_sequence(model_settings: dict, seq_len: int, num_masked: int) -> float:
    """Useful training FLOPs (forward + backward) of one sequence of BERT pretraining, the same for both sides.

    The encoder and the [hidden, vocab] MLM decoder at the `num_masked` positions the loss needs
    (`transformer_training_flops_per_sequence`), plus BERT's heads: the MLM head's dense transform at those
    positions, the pooler and the NSP classifier once per sequence. Side (b) does more work than this (the
    decoder at every position); MFU counts only the useful part.
    """
    from ipu_trainer.training.mfu import transformer_training_flops_per_sequence

    h = model_settings["hidden_size"]
    encoder_and_decoder = transformer_training_flops_per_sequence(
        hidden_size=h, num_layers=model_settings["num_hidden_layers"],
        intermediate_size=model_settings["intermediate_size"], seq_len=seq_len,
        vocab_size=model_settings["vocab_size"], logit_positions=num_masked)
    heads = 6 * (h * h * num_masked + h * h + 2 * h)  # MLM transform, pooler, NSP; 6 = 2 FLOPs x 3 passes
    return encoder_and_decoder + heads


# ---- one side (runs in a subprocess) ----------------------------------------------------------------

def run_side(args: argparse.Namespace) -> dict:
    import psutil
    import torch
    from transformers import (BertConfig, BertForPreTraining, BertTokenizer, DataCollatorForLanguageModeling,
                              Trainer, TrainerCallback, TrainingArguments, set_seed)
    from transformers.utils import logging as hf_logging

    # Submodule imports: they also work when the editable install resolves `ipu_trainer` as a namespace package.
    from ipu_trainer.config.ipu_config import IPUConfig
    from ipu_trainer.training.trainer import IPUTrainer
    from ipu_trainer.run.training_args import IPUTrainingArguments
    from ipu_trainer.data.collators import DataCollatorForLanguageModelingWithMaxTokensMasked, max_num_masked_tokens
    from ipu_trainer.models import BertForPreTrainingMaskedPositions

    hf_logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = cuda and not args.fp32

    # Data and tokenizer, as the parent built them
    tokenizer = BertTokenizer.from_pretrained(args.data_dir)
    with open(os.path.join(args.data_dir, "rows.json"), encoding="utf-8") as f:
        dataset = RowsDataset(json.load(f))
    seq_len = len(dataset[0]["input_ids"])
    num_masked = max_num_masked_tokens(seq_len, MLM_PROBABILITY)
    rss_before = psutil.Process().memory_info().rss
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    # Model: the same config and seed on both sides
    set_seed(args.seed)
    config = BertConfig(max_position_embeddings=max(512, seq_len), **args.model)
    common = dict(
        output_dir=os.path.join(args.data_dir, f"out-{args.side}"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=LEARNING_RATE, seed=args.seed,
        logging_steps=args.steps, save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
    )
    if args.side == "a":
        config.max_num_masked_tokens = num_masked
        model = BertForPreTrainingMaskedPositions(config)
        model.static_masked_positions = args.static_k
        ipu_config = IPUConfig(gradient_accumulation_steps=args.grad_accum)
        training_args = IPUTrainingArguments(**common, fp32=args.fp32 or not cuda, lamb=args.lamb)
        collator = DataCollatorForLanguageModelingWithMaxTokensMasked(
            tokenizer=tokenizer, mlm_probability=MLM_PROBABILITY, max_seq_length=seq_len, seed=args.seed)
        make_trainer = lambda **kw: IPUTrainer(model=model, ipu_config=ipu_config, args=training_args, **kw)  # noqa: E731
    else:
        model = BertForPreTraining(config)
        training_args = TrainingArguments(**common, gradient_accumulation_steps=args.grad_accum, bf16=bf16)
        collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=MLM_PROBABILITY, seed=args.seed)
        make_trainer = lambda **kw: Trainer(model=model, args=training_args, **kw)  # noqa: E731

    # Trainer, with a callback that stamps the end of every step from the last untimed one on. On CPU
    # the stamps are free; on CUDA each syncs, which is harmless at BERT-base steps of many micro-batches.
    stamps: dict[int, float] = {}

    class StepTimer(TrainerCallback):
        def on_train_begin(self, _args, state, _control, **kwargs):
            stamps[0] = time.perf_counter()

        def on_step_end(self, _args, state, _control, **kwargs):
            if state.global_step >= args.warmup_steps:
                if cuda:
                    torch.cuda.synchronize(device)
                stamps[state.global_step] = time.perf_counter()

    trainer = make_trainer(data_collator=collator, train_dataset=dataset, callbacks=[StepTimer()])
    result = trainer.train()

    # Results: step time = wall time between consecutive step ends (data loading included)
    step_seconds = [stamps[i] - stamps[i - 1] for i in range(args.warmup_steps + 1, args.steps + 1)]
    out = {
        "side": args.side,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads",
        "precision": "bf16 autocast" if bf16 else "fp32",
        "optimizer": ("LAMB" if args.lamb else "original AdamW") if args.side == "a" else
                     str(getattr(training_args.optim, "value", training_args.optim)),
        "step_seconds": step_seconds,
        "train_loss": result.training_loss,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if cuda:
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["flops_per_sample"] = model_flops_per_sequence(args.model, seq_len, num_masked)
        out["matmul_dtype"] = "bfloat16" if bf16 else "float32"
        out["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    else:
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
        out["peak_memory_mb"] = peak_rss / 2**20
        out["peak_rise_mb"] = (peak_rss - rss_before) / 2**20
    return out


# ---- the parent: data once, one subprocess per side, the table --------------------------------------

def run_subprocess(args: argparse.Namespace, side: str, data_dir: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--side", side, "--data-dir", data_dir,
               "--preset", args.preset, "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
               "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum), "--seed", str(args.seed)]
    command += [flag for flag, on in (("--lamb", args.lamb), ("--fp32", args.fp32), ("--tiny", args.tiny),
                                               ("--static-k", args.static_k)) if on]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise RuntimeError(f"side ({side}) failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict], samples_per_step: int, seq_len: int) -> dict:
    """One side's rounds -> its row. Speed comes from the fastest timed step: on a shared machine, other
    load only ever slows a step down, so the minimum is the best estimate of the side's own speed (the
    reasoning of `timeit`); the mean over all timed steps is printed next to it. Memory: the highest peak."""
    steps = [t for run in runs for t in run["step_seconds"]]
    row = dict(runs[0])
    row["samples_per_s"] = samples_per_step / min(steps)
    row["mean_samples_per_s"] = samples_per_step * len(steps) / sum(steps)
    row["tokens_per_s"] = row["samples_per_s"] * seq_len
    for key in ("peak_memory_mb", "peak_rise_mb"):
        if key in row:
            row[key] = max(run[key] for run in runs)
    if "flops_per_sample" in row:  # CUDA: MFU against the datasheet peak, None for a GPU not in the table
        import torch

        from ipu_trainer.training.mfu import datasheet_peak_flops

        peak = datasheet_peak_flops(row["device"], getattr(torch, row["matmul_dtype"]), tf32=row["tf32"])
        row["mfu"] = row["flops_per_sample"] * row["samples_per_s"] / peak[0] if peak else None
        row["mfu_peak"] = peak[1] if peak else None
    return row


def table_lines(results: dict[str, dict]) -> list[str]:
    """The table of both sides' rows (with MFU and the peak it is measured against on CUDA) and the speedup."""
    a, b = results["a"], results["b"]
    on_gpu = "mfu" in a
    lines = []
    if on_gpu:
        lines.append(f"MFU against the datasheet peak: {a['mfu_peak']}" if a["mfu_peak"] else
                     f"MFU: n/a (unknown GPU peak: no {a['matmul_dtype']} entry for {a['device']!r} in ipu_trainer/training/mfu.py)")
    memory_column = "peak mem MB" if on_gpu else "peak RSS MB (rise)"
    header = f"{'side':<52} {'samples/s':>10} {'(mean)':>7} {'tokens/s':>10} {memory_column:>20}"
    lines.append(header + (f" {'MFU':>7}" if on_gpu else ""))
    labels = {
        "a": f"(a) IPUTrainer + masked-pos. BERT, {a['optimizer']}",
        "b": f"(b) Trainer + BertForPreTraining, {b['optimizer']}",
    }
    for side, r in results.items():
        memory = f"{r['peak_memory_mb']:.0f}" + (f" ({r['peak_rise_mb']:+.0f})" if "peak_rise_mb" in r else "")
        line = (f"{labels[side]:<52} {r['samples_per_s']:>10.1f} {r['mean_samples_per_s']:>7.1f} "
                f"{r['tokens_per_s']:>10.0f} {memory:>20}")
        if on_gpu:
            line += f" {r['mfu']:>7.1%}" if r["mfu"] is not None else f" {'n/a':>7}"
        lines.append(line)
    lines.append(f"speedup: {a['samples_per_s'] / b['samples_per_s']:.2f}x")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side:
        print(json.dumps(run_side(args)))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as data_dir:
        # Data: one tokenizer and one set of rows, read by both sides
        tokenizer = build_tokenizer(data_dir, args.model["vocab_size"])
        rows = build_rows(tokenizer, args.model["seq_len"], args.steps * args.batch_size * args.grad_accum, args.seed)
        with open(os.path.join(data_dir, "rows.json"), "w", encoding="utf-8") as f:
            json.dump(rows, f)

        # Sides: alternating a, b, a, b, ... so both meet the same background load
        runs: dict[str, list[dict]] = {"a": [], "b": []}
        for _ in range(args.rounds):
            for side in ("a", "b"):
                runs[side].append(run_subprocess(args, side, data_dir))
    results = {side: summarize(side_runs, args.batch_size * args.grad_accum, args.model["seq_len"])
               for side, side_runs in runs.items()}

    a = results["a"]
    m = args.model
    print(f"preset {args.preset}{' (tiny)' if args.tiny else ''}: hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
          f"{m['num_attention_heads']} heads, intermediate {m['intermediate_size']}, vocab {m['vocab_size']}, "
          f"seq {m['seq_len']}; micro-batch {args.batch_size} x {args.grad_accum} per step; "
          f"{args.rounds} x {args.steps} steps per side, first {args.warmup_steps} of each untimed" + ("; (a) with --static-k" if args.static_k else ""))
    print(f"device: {a['device']}; precision: {a['precision']}; data: pydoc English text, packed rows, "
          f"padding fraction {padding_fraction(rows):.1%}")
    for line in table_lines(results):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
