"""Numeric precision of a run: which mixed precision accelerate applies, and the float16 loss scale.

The IPU examples train in half precision unless `--fp32`. Off the IPU that intent becomes autocast mixed
precision (weights and optimizer state stay float32), applied by accelerate, the same path
`transformers.Trainer` uses for `--bf16` / `--fp16`: exactly one autocast and, in float16, one
`GradScaler`, which skips an update whose gradients overflow (the learning-rate schedule then does not
advance, as upstream).

- CUDA: bfloat16 where the GPU runs it natively, float16 with loss scaling where it does not
  (`--loss_scaling` is the scaler's starting value; static unless `--auto_loss_scaling`: a static scale never
  changes, and an update that overflows is skipped).
- CPU: bfloat16 where the CPU has native bfloat16 instructions, else float32: emulated bfloat16 was
  measured about a hundred times slower than float32 on such a CPU. float16 autocast on a CPU is refused.
- A CPU run with `--device_model NAME` decides as that GPU (its bfloat16 support is the model's) and runs the
  chosen autocast and `GradScaler` on the CPU.

`--fp16` / `--bf16`, or an `ACCELERATE_MIXED_PRECISION` of fp16 / bf16 set by `accelerate launch`, ask for
one half-precision type explicitly; `--fp32` overrides both.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .device_model import DeviceModel

logger = logging.getLogger(__name__)

# The dynamic scaler's default starting scale and growth interval (torch's own defaults).
DEFAULT_LOSS_SCALE = 2.0**16
DYNAMIC_GROWTH_INTERVAL = 2000

_MIXED_PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ENVIRONMENT_REQUEST = "ACCELERATE_MIXED_PRECISION"


# ---- Private upstream touchpoints ------------------------------------------------------------------
# torch has no public query for native bfloat16 on the CPU. These two report the AVX512-BF16 and AMX
# instructions; tests/test_precision.py fails by name if either disappears.


def cpu_has_fast_bfloat16() -> bool:
    """True when the CPU executes bfloat16 natively (AVX512-BF16 or AMX), not by emulation."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


# -----------------------------------------------------------------------------------------------------


def cuda_has_native_bfloat16() -> bool:
    """True when the current GPU has bfloat16 tensor cores (Ampere or newer); emulation does not count."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


class StaticLossScaler(torch.amp.GradScaler):
    """torch's `GradScaler` with a scale that never changes (`--loss_scaling N` without `--auto_loss_scaling`).

    Scaling, unscaling, the inf/NaN check and the skipped step are upstream's; only `update()` keeps the scale
    where it is. torch refuses a backoff factor of 1, so an overflow would otherwise halve the scale. An update
    skipped this way is counted by the trainer, which stops the run after a run of them (a static scale that
    overflows once usually overflows again).
    """

    def update(self, new_scale: Optional[float | torch.Tensor] = None) -> None:
        if new_scale is None and self.is_enabled():
            new_scale = self.get_scale()
        super().update(new_scale)


@dataclass(frozen=True)
class Precision:
    """The run's precision.

    mixed_precision: what accelerate applies, "no", "bf16" or "fp16" (accelerate's names).
    reason: why, for the start-up log.
    loss_scale / dynamic_loss_scale: the float16 `GradScaler`'s starting scale and whether it grows.
    """

    mixed_precision: str
    reason: str
    loss_scale: Optional[float] = None
    dynamic_loss_scale: bool = False

    @property
    def compute_dtype(self) -> torch.dtype:
        return _MIXED_PRECISION_DTYPES[self.mixed_precision]

    @property
    def name(self) -> str:
        return str(self.compute_dtype).replace("torch.", "")

    def grad_scaler(self, device_type: str) -> Optional[torch.amp.GradScaler]:
        """The float16 loss scaler for `device_type` (None unless float16)."""
        if self.mixed_precision != "fp16":
            return None
        if self.dynamic_loss_scale:
            return torch.amp.GradScaler(device_type, init_scale=self.loss_scale, growth_interval=DYNAMIC_GROWTH_INTERVAL)
        return StaticLossScaler(device_type, init_scale=self.loss_scale)

    def describe(self) -> str:
        text = f"{self.name} ({self.reason})"
        if self.mixed_precision != "no":
            text += ", autocast by accelerate, weights in float32"
        if self.loss_scale is not None:
            kind = "dynamic" if self.dynamic_loss_scale else "static"
            text += f", {kind} loss scale {self.loss_scale:g}"
        return text


def requested_half_precision(fp16: bool, bf16: bool) -> tuple[Optional[str], str]:
    """("fp16" | "bf16" | None, where it came from): the flags first, then accelerate's environment."""
    if fp16:
        return "fp16", "--fp16"
    if bf16:
        return "bf16", "--bf16"
    from_environment = os.environ.get(_ENVIRONMENT_REQUEST, "").lower()
    if from_environment in ("fp16", "bf16"):
        return from_environment, f"{_ENVIRONMENT_REQUEST}={from_environment}"
    return None, ""


def resolve_precision(
    device: torch.device,
    fp32: bool,
    fp16: bool,
    bf16: bool,
    loss_scaling: Optional[float],
    auto_loss_scaling: bool,
    device_model: Optional[DeviceModel] = None,
) -> Precision:
    """The precision of a run on `device` from the user's flags; see the module docstring for the rules. With a
    `device_model` the run is on the CPU but decides as that GPU: its bfloat16 support comes from the model."""
    requested, source = requested_half_precision(fp16, bf16)
    on_gpu = device.type == "cuda" or device_model is not None
    if device_model is not None:
        native_bfloat16, gpu = device_model.native_bfloat16, f"the modelled {device_model.title}"
    elif device.type == "cuda":
        native_bfloat16, gpu = cuda_has_native_bfloat16(), "this GPU"
    if fp32:
        if requested and source.startswith(_ENVIRONMENT_REQUEST):
            logger.info("--fp32 given: %s is not applied.", source)
        precision = Precision("no", "--fp32")
    elif requested == "fp16":
        if not on_gpu and device.type == "cpu":
            raise ValueError(
                f"{source} asks for float16 autocast, which needs a GPU: on this CPU drop it (half precision then "
                "means bfloat16 where the CPU has it, else float32) or pass --bf16"
            )
        precision = Precision("fp16", source)
    elif requested == "bf16":
        if on_gpu and not native_bfloat16:
            name = device_model.device_name if device_model is not None else torch.cuda.get_device_name(device)
            raise ValueError(
                f"{source} asks for bfloat16, but {gpu} ({name}) has no native bfloat16: drop it (half precision "
                "then means float16 with loss scaling here) or pass --fp16"
            )
        if device.type == "cpu" and not on_gpu and not cpu_has_fast_bfloat16():
            logger.warning("%s on a CPU without native bfloat16: it is emulated and much slower than float32.", source)
        precision = Precision("bf16", source)
    elif on_gpu:
        if native_bfloat16:
            precision = Precision("bf16", f"half precision: bfloat16 on {gpu}")
        else:
            precision = Precision("fp16", f"half precision: float16, {gpu} has no native bfloat16")
    elif device.type == "cpu" and cpu_has_fast_bfloat16():
        precision = Precision("bf16", "half precision: bfloat16, native on this CPU")
    else:
        precision = Precision("no", f"this {device.type.upper()} has no fast half precision (--bf16 forces it)")

    if precision.mixed_precision == "fp16":
        dynamic = auto_loss_scaling or loss_scaling is None
        # Without a given scale float16 gradients underflow; start high and let the scale adapt.
        scale = DEFAULT_LOSS_SCALE if loss_scaling is None else float(loss_scaling)
        return Precision("fp16", precision.reason, loss_scale=scale, dynamic_loss_scale=dynamic)
    if loss_scaling is not None or auto_loss_scaling:
        logger.info("Loss scaling is only needed in float16; not used in %s.", precision.name)
    return precision
