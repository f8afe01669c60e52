"""MFU: the datasheet peak lookup by device name and dtype, the transformer FLOPs formula, and the
benchmark's MFU rows."""

import importlib.util
import os
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel

from ipu_trainer.training import mfu
from ipu_trainer.training.mfu import datasheet_peak_flops, transformer_training_flops_per_sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Names as torch.cuda.get_device_name() gives them -> table row, bf16 dense TFLOP/s (None: no bf16).
REAL_NAMES = {
    "NVIDIA H100 80GB HBM3": ("NVIDIA H100 SXM", 989.4),
    "NVIDIA H100 PCIe": ("NVIDIA H100 PCIe", 756.0),
    "NVIDIA H100 NVL": ("NVIDIA H100 NVL", 835.5),
    "NVIDIA H200": ("NVIDIA H200 SXM", 989.4),
    "NVIDIA H200 NVL": ("NVIDIA H200 NVL", 835.5),
    "NVIDIA GH200 480GB": ("NVIDIA GH200", 989.4),
    "NVIDIA B200": ("NVIDIA B200", 2250.0),
    "NVIDIA A100-SXM4-80GB": ("NVIDIA A100", 312.0),
    "NVIDIA A100-SXM4-40GB": ("NVIDIA A100", 312.0),
    "NVIDIA A100-PCIE-40GB": ("NVIDIA A100", 312.0),
    "NVIDIA A100 80GB PCIe": ("NVIDIA A100", 312.0),
    "NVIDIA A10": ("NVIDIA A10", 125.0),
    "NVIDIA A10G": ("NVIDIA A10G", 70.0),
    "NVIDIA L4": ("NVIDIA L4", 121.0),
    "NVIDIA L40": ("NVIDIA L40", 181.0),
    "NVIDIA L40S": ("NVIDIA L40S", 366.0),
    "Tesla V100-SXM2-16GB": ("NVIDIA V100 SXM2", None),
    "Tesla V100-SXM2-32GB": ("NVIDIA V100 SXM2", None),
    "Tesla V100-PCIE-32GB": ("NVIDIA V100 PCIe", None),
    "Tesla V100S-PCIE-32GB": ("NVIDIA V100S PCIe", None),
    "Tesla T4": ("NVIDIA T4", None),
    "NVIDIA GeForce RTX 3090": ("NVIDIA GeForce RTX 3090", 71.0),
    "NVIDIA GeForce RTX 4090": ("NVIDIA GeForce RTX 4090", 165.2),
}


@pytest.mark.parametrize("device_name", sorted(REAL_NAMES))
def test_bf16_peak_of_each_real_device_name(device_name):
    row, tflops = REAL_NAMES[device_name]
    peak = datasheet_peak_flops(device_name, torch.bfloat16)
    if tflops is None:
        assert peak is None  # V100 and T4 have no bfloat16 tensor cores
    else:
        assert peak == (tflops * 1e12, f"{row} bf16 dense {tflops:g} TFLOP/s")


def test_each_real_name_matches_exactly_one_row():
    for device_name, (row, _) in REAL_NAMES.items():
        name = mfu._normalise(device_name)
        hits = [gpu.name for gpu in mfu._GPUS if re.search(gpu.pattern, name)]
        assert hits == [row], (device_name, hits)


@pytest.mark.parametrize("device_name, dtype, tf32, tflops, says", [
    ("NVIDIA A100-SXM4-80GB", torch.float32, False, 19.5, "NVIDIA A100 fp32 19.5 TFLOP/s (plain FP32, TF32 off)"),
    ("NVIDIA A100-SXM4-80GB", torch.float32, True, 156.0, "NVIDIA A100 tf32 dense 156 TFLOP/s"),
    ("NVIDIA H100 PCIe", torch.float32, True, 378.0, "NVIDIA H100 PCIe tf32 dense 378 TFLOP/s"),
    ("Tesla V100-SXM2-16GB", torch.float32, True, 15.7, "NVIDIA V100 SXM2 fp32 15.7 TFLOP/s (plain FP32, no TF32 on this GPU)"),
    ("Tesla V100-SXM2-16GB", torch.float16, False, 125.0, "NVIDIA V100 SXM2 fp16 dense 125 TFLOP/s"),
    ("Tesla T4", torch.float16, False, 65.0, "NVIDIA T4 fp16 dense 65 TFLOP/s"),
    ("NVIDIA GeForce RTX 4090", torch.float16, False, 165.2, "NVIDIA GeForce RTX 4090 fp16 dense 165.2 TFLOP/s"),
    ("NVIDIA H100 80GB HBM3", torch.float16, False, 989.4, "NVIDIA H100 SXM fp16 dense 989.4 TFLOP/s"),
])
def test_float32_and_float16_peaks(device_name, dtype, tf32, tflops, says):
    flops, description = datasheet_peak_flops(device_name, dtype, tf32=tf32)
    assert flops == tflops * 1e12
    assert description.startswith(says), description


@pytest.mark.parametrize("device_name", [
    "NVIDIA B300", "AMD Instinct MI300X", "NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA GeForce RTX 4090 D",
    "NVIDIA GeForce RTX 3090 Ti", "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "NVIDIA A100-SXM4-40GB MIG 3g.20gb", "",
])
def test_unknown_gpus_and_mig_slices_have_no_peak(device_name):
    assert datasheet_peak_flops(device_name, torch.bfloat16) is None
    assert datasheet_peak_flops(device_name, torch.float32) is None


def test_other_dtypes_are_refused():
    with pytest.raises(ValueError, match="dtype=torch.float64"):
        datasheet_peak_flops("NVIDIA A100-SXM4-80GB", torch.float64)


def test_docstring_table_is_the_lookup_table():
    """The table a reader checks against the datasheets is the one the code uses."""
    rows = [line for line in mfu.__doc__.splitlines() if re.match(r"\| \w", line) and not line.startswith("| GPU")]
    assert len(rows) == len(mfu._GPUS)
    for line, gpu in zip(rows, mfu._GPUS):
        numbers = [None if cell.strip() == "-" else float(cell) for cell in line.strip("|").split("|")[2:]]
        assert numbers == [gpu.fp32, gpu.tf32, gpu.fp16, gpu.bf16], (line, gpu)


# ---- FLOPs of a training step --------------------------------------------------------------------------

def test_transformer_flops_by_hand():
    # h=4, 2 layers, intermediate 8, seq 3, vocab 10. Forward multiply-adds per layer:
    # projections 4*4*4*3 = 192, feed-forward 2*4*8*3 = 192, attention 2*3*3*4 = 72 -> 456; two layers 912.
    # Vocabulary projection 4*10 per position. FLOPs = 2 per multiply-add, training = 3 x forward.
    settings = dict(hidden_size=4, num_layers=2, intermediate_size=8, seq_len=3, vocab_size=10)
    assert transformer_training_flops_per_sequence(**settings) == 3 * 2 * (912 + 40 * 3)
    assert transformer_training_flops_per_sequence(**settings, logit_positions=1) == 3 * 2 * (912 + 40)


def test_transformer_flops_match_torch_flop_counter_on_a_bert_encoder():
    """Forward + backward of a BERT encoder and a vocabulary projection at every position, as counted by
    torch's FLOP counter (matmuls only: what the formula counts)."""
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=16, attn_implementation="eager")
    encoder = BertModel(config, add_pooling_layer=False)
    decoder = torch.nn.Linear(config.hidden_size, config.vocab_size)
    input_ids = torch.randint(0, config.vocab_size, (1, 16))
    with FlopCounterMode(display=False) as counter:
        decoder(encoder(input_ids=input_ids).last_hidden_state).sum().backward()
    expected = transformer_training_flops_per_sequence(
        hidden_size=32, num_layers=2, intermediate_size=48, seq_len=16, vocab_size=50)
    assert counter.get_total_flops() == expected


# ---- the benchmark's MFU rows ----------------------------------------------------------------------------

def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_pretrain", os.path.join(REPO, "bench", "pretrain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _side_run(side: str, device: str, flops_per_sample: float) -> dict:
    """One side's JSON line as a CUDA run writes it."""
    return {"side": side, "device": device, "precision": "bf16 autocast", "optimizer": "adamw_torch_fused",
            "step_seconds": [0.5, 0.25], "train_loss": 7.0, "parameters": 110_000_000, "peak_memory_mb": 9000.0,
            "flops_per_sample": flops_per_sample, "matmul_dtype": "bfloat16", "tf32": False}


def test_bench_reports_mfu_against_the_datasheet_peak():
    bench = _load_bench()
    # 512 samples per step, fastest step 0.25 s: 2048 samples/s; flops chosen for 50% (a) and 25% (b) of 989.4 TF.
    flops_at_half = 0.5 * 989.4e12 / 2048
    results = {side: bench.summarize([_side_run(side, "NVIDIA H100 80GB HBM3", flops_at_half * share)], 512, 128)
               for side, share in (("a", 1.0), ("b", 0.5))}
    lines = bench.table_lines(results)
    assert lines[0] == "MFU against the datasheet peak: NVIDIA H100 SXM bf16 dense 989.4 TFLOP/s"
    assert lines[1].split()[-1] == "MFU"
    assert lines[2].startswith("(a) IPUTrainer") and lines[2].endswith(" 50.0%"), lines[2]
    assert lines[3].startswith("(b) Trainer") and lines[3].endswith(" 25.0%"), lines[3]
    assert lines[-1] == "speedup: 1.00x"


def test_bench_says_when_the_gpu_peak_is_unknown():
    bench = _load_bench()
    results = {side: bench.summarize([_side_run(side, "NVIDIA B300", 1e9)], 512, 128) for side in "ab"}
    lines = bench.table_lines(results)
    assert lines[0].startswith("MFU: n/a (unknown GPU peak"), lines[0]
    assert "'NVIDIA B300'" in lines[0]
    assert all(line.endswith(" n/a") for line in lines[2:4]), lines


def test_bench_flops_per_sequence_adds_bert_heads_to_the_encoder():
    bench = _load_bench()
    settings = dict(hidden_size=4, num_hidden_layers=2, intermediate_size=8, vocab_size=10, num_attention_heads=2)
    # the hand computation above with 2 logit positions, + MLM transform (2 x 4*4), pooler (4*4), NSP (4*2)
    expected = 3 * 2 * (912 + 40 * 2) + 3 * 2 * (2 * 16 + 16 + 8)
    assert bench.model_flops_per_sequence(settings, seq_len=3, num_masked=2) == expected
