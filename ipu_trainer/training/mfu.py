"""Model FLOP utilisation (MFU): the training FLOPs a model needs, over what the GPU's datasheet says it can do.

MFU = (useful training FLOPs per sample x samples per second) / peak FLOP/s of the device for the dtype
the matmuls run in. Peaks are the datasheets' dense figures (no 2:4 structured sparsity), so MFU is
comparable across runs, machines and reports, unlike a peak measured on the spot.

Dense peak TFLOP/s by GPU and matmul dtype, from the NVIDIA datasheets and architecture whitepapers.
Datasheets of the Hopper and Ada parts quote tensor-core rates with sparsity; the dense rate is half that
figure. The fp16 column is the rate with float32 accumulation, which is what float16 autocast's matmuls
use (GeForce cards, the A10G and the L40 run it at half their float16-accumulate rate). fp32 is the
plain CUDA-core rate; tf32 the tensor-core rate that float32 matmuls get when TF32 is allowed
(`torch.backends.cuda.matmul.allow_tf32`, off by default in PyTorch). "-": no such tensor cores.

| GPU                  | torch.cuda.get_device_name(), e.g.           | fp32 | tf32  | fp16  | bf16  |
| -------------------- | -------------------------------------------- | ---- | ----- | ----- | ----- |
| H100 SXM             | NVIDIA H100 80GB HBM3                        | 66.9 | 494.7 | 989.4 | 989.4 |
| H100 PCIe            | NVIDIA H100 PCIe                             | 51.2 | 378   | 756   | 756   |
| H100 NVL             | NVIDIA H100 NVL                              | 60   | 417.5 | 835.5 | 835.5 |
| H200 SXM             | NVIDIA H200                                  | 66.9 | 494.7 | 989.4 | 989.4 |
| H200 NVL             | NVIDIA H200 NVL                              | 60   | 417.5 | 835.5 | 835.5 |
| GH200 (its GPU)      | NVIDIA GH200 480GB                           | 66.9 | 494.7 | 989.4 | 989.4 |
| B200 (2)             | NVIDIA B200                                  | 75   | 1125  | 2250  | 2250  |
| A100 SXM4/PCIe 40/80 | NVIDIA A100-SXM4-80GB, NVIDIA A100-PCIE-40GB | 19.5 | 156   | 312   | 312   |
| A10                  | NVIDIA A10                                   | 31.2 | 62.5  | 125   | 125   |
| A10G (1)             | NVIDIA A10G                                  | 35   | 35    | 70    | 70    |
| L4                   | NVIDIA L4                                    | 30.3 | 60    | 121   | 121   |
| L40                  | NVIDIA L40                                   | 90.5 | 90.5  | 181   | 181   |
| L40S                 | NVIDIA L40S                                  | 91.6 | 183   | 366   | 366   |
| V100 SXM2            | Tesla V100-SXM2-16GB                         | 15.7 | -     | 125   | -     |
| V100 PCIe            | Tesla V100-PCIE-32GB                         | 14   | -     | 112   | -     |
| V100S PCIe           | Tesla V100S-PCIE-32GB                        | 16.4 | -     | 130   | -     |
| T4                   | Tesla T4                                     | 8.1  | -     | 65    | -     |
| GeForce RTX 3090     | NVIDIA GeForce RTX 3090                      | 35.6 | 35.6  | 71    | 71    |
| GeForce RTX 4090     | NVIDIA GeForce RTX 4090                      | 82.6 | 82.6  | 165.2 | 165.2 |

(1) The A10G is made for AWS and has no public NVIDIA datasheet; its figures are AWS's, and match its
80 SMs at 1.71 GHz with GA102's half-rate float32-accumulate tensor math.
(2) NVIDIA quotes the B200 for the 8-GPU HGX B200 board (1000 W per GPU): FP32 600 TFLOP/s and, with
sparsity, TF32 18 and FP16/BF16 36 PFLOP/s. One GPU's dense share is an eighth of that, the sparse ones halved.

Any other name, including a MIG slice (it gets a fraction of the GPU), a laptop or "D"/"Ti" variant, has
no entry: the lookup answers None and callers report MFU as unknown rather than against a wrong peak.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

TERA = 1e12


@dataclass(frozen=True)
class _Peaks:
    """One GPU's dense peaks in TFLOP/s; None where it has no tensor cores for that format."""

    name: str
    pattern: str  # searched in the normalised device name (upper case, '-' and '_' as spaces)
    fp32: float
    tf32: Optional[float]
    fp16: float
    bf16: Optional[float]


# Each pattern matches its own GPU's names only (tests/test_mfu.py checks real names hit exactly one).
_GPUS = (
    _Peaks("NVIDIA H100 SXM", r"\bH100\b.*\b(HBM3|SXM\d?)\b", 66.9, 494.7, 989.4, 989.4),
    _Peaks("NVIDIA H100 PCIe", r"\bH100 PCIE\b", 51.2, 378.0, 756.0, 756.0),
    _Peaks("NVIDIA H100 NVL", r"\bH100 NVL\b", 60.0, 417.5, 835.5, 835.5),
    _Peaks("NVIDIA H200 SXM", r"\bH200\b(?! NVL)", 66.9, 494.7, 989.4, 989.4),
    _Peaks("NVIDIA H200 NVL", r"\bH200 NVL\b", 60.0, 417.5, 835.5, 835.5),
    _Peaks("NVIDIA GH200", r"\bGH200\b", 66.9, 494.7, 989.4, 989.4),
    _Peaks("NVIDIA B200", r"\bB200\b", 75.0, 1125.0, 2250.0, 2250.0),
    _Peaks("NVIDIA A100", r"\bA100\b", 19.5, 156.0, 312.0, 312.0),
    _Peaks("NVIDIA A10", r"\bA10\b", 31.2, 62.5, 125.0, 125.0),
    _Peaks("NVIDIA A10G", r"\bA10G\b", 35.0, 35.0, 70.0, 70.0),
    _Peaks("NVIDIA L4", r"\bL4\b", 30.3, 60.0, 121.0, 121.0),
    _Peaks("NVIDIA L40", r"\bL40\b", 90.5, 90.5, 181.0, 181.0),
    _Peaks("NVIDIA L40S", r"\bL40S\b", 91.6, 183.0, 366.0, 366.0),
    _Peaks("NVIDIA V100 SXM2", r"\bV100 SXM2\b", 15.7, None, 125.0, None),
    _Peaks("NVIDIA V100 PCIe", r"\bV100 PCIE\b", 14.0, None, 112.0, None),
    _Peaks("NVIDIA V100S PCIe", r"\bV100S\b", 16.4, None, 130.0, None),
    _Peaks("NVIDIA T4", r"\bT4\b", 8.1, None, 65.0, None),
    _Peaks("NVIDIA GeForce RTX 3090", r"\bRTX 3090$", 35.6, 35.6, 71.0, 71.0),
    _Peaks("NVIDIA GeForce RTX 4090", r"\bRTX 4090$", 82.6, 82.6, 165.2, 165.2),
)


def _normalise(device_name: str) -> str:
    return re.sub(r"[\s_-]+", " ", device_name.upper()).strip()


def _gpu_peaks(device_name: str) -> Optional[_Peaks]:
    """The table row for a `torch.cuda.get_device_name()` string, or None for a GPU not in the table."""
    name = _normalise(device_name)
    if re.search(r"\bMIG\b", name):
        return None
    for gpu in _GPUS:
        if re.search(gpu.pattern, name):
            return gpu
    return None


def datasheet_peak_flops(device_name: str, dtype: torch.dtype, *, tf32: bool = False) -> Optional[tuple[float, str]]:
    """Dense datasheet peak FLOP/s of the GPU called `device_name` for matmuls in `dtype`, with a description.

    `tf32`: whether float32 matmuls may use TF32 tensor cores (`torch.backends.cuda.matmul.allow_tf32`);
    without it float32 counts against the plain FP32 rate. Returns None for a GPU not in the table and
    for bfloat16 on a GPU without bfloat16 tensor cores (V100, T4).
    """
    gpu = _gpu_peaks(device_name)
    if gpu is None:
        return None
    if dtype == torch.float32:
        if tf32 and gpu.tf32 is not None:
            return gpu.tf32 * TERA, f"{gpu.name} tf32 dense {gpu.tf32:g} TFLOP/s (float32 matmuls on TF32 tensor cores)"
        why = "no TF32 on this GPU" if tf32 else "TF32 off"
        return gpu.fp32 * TERA, f"{gpu.name} fp32 {gpu.fp32:g} TFLOP/s (plain FP32, {why})"
    if dtype == torch.float16:
        return gpu.fp16 * TERA, f"{gpu.name} fp16 dense {gpu.fp16:g} TFLOP/s (float32 accumulate)"
    if dtype == torch.bfloat16:
        if gpu.bf16 is None:
            return None
        return gpu.bf16 * TERA, f"{gpu.name} bf16 dense {gpu.bf16:g} TFLOP/s"
    raise ValueError(f"dtype={dtype}: datasheet peaks are known for torch.float32, torch.float16 and torch.bfloat16")


def transformer_training_flops_per_sequence(
    *, hidden_size: int, num_layers: int, intermediate_size: int, seq_len: int, vocab_size: int,
    logit_positions: Optional[int] = None,
) -> float:
    """Matmul FLOPs to train on one sequence (forward and backward) of a BERT- or GPT-style transformer.

    Forward, per token and layer: the query, key, value and output projections (4 h^2 multiply-adds), the
    feed-forward block (2 h i) and attention, scores and weighted sum (2 seq h); a multiply-add is 2 FLOPs.
    The vocabulary projection (h V) counts at `logit_positions` positions of the sequence (default: every
    one; a masked-LM head that runs only at the masked positions passes their number). Backward costs twice
    the forward (gradients of activations and of weights), so training is 3 x forward. Left out: embedding
    lookups, norms, softmax, activations (not matmuls), and model-specific heads, which callers add.
    Attention is counted in full for causal models too, as MFU figures are usually quoted. Per token: divide
    by `seq_len`.
    """
    h, s = hidden_size, seq_len
    positions = seq_len if logit_positions is None else logit_positions
    per_layer = 2 * (4 * h * h + 2 * h * intermediate_size) * s + 2 * (2 * s * s * h)
    vocabulary_projection = 2 * h * vocab_size * positions
    return 3.0 * (num_layers * per_layer + vocabulary_projection)
