"""Numeric precision of a run: which autocast dtype, and float16 loss scaling.

The IPU examples train in half precision unless `--fp32`. Off the IPU we keep that intent as autocast
mixed precision (weights and optimizer state stay float32): bfloat16 where the device runs it fast,
float16 with loss scaling where it has no bfloat16. A CPU without native bfloat16 instructions
emulates it about a hundred times slower than float32, so there the run stays in float32 and says so.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cpu_has_fast_bfloat16() -> bool:
    """True when oneDNN reports native bfloat16 support (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_compute_dtype(device: torch.device, fp32: bool, requested: Optional[str]) -> tuple[torch.dtype, str]:
    """Pick the autocast dtype for `device` and a short reason for the start-up log.

    `requested` is "fp16"/"bf16" when the user passed `--fp16`/`--bf16`, which always wins.
    """
    if fp32:
        return torch.float32, "--fp32"
    if requested == "fp16":
        return torch.float16, "--fp16"
    if requested == "bf16":
        return torch.bfloat16, "--bf16"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "half precision (bfloat16 on this GPU)"
        return torch.float16, "half precision (float16: this GPU has no bfloat16)"
    if device.type == "cpu" and cpu_has_fast_bfloat16():
        return torch.bfloat16, "half precision (bfloat16, native on this CPU)"
    return torch.float32, f"float32: this {device.type.upper()} has no fast half precision (pass --bf16 to force it)"


class LossScaler:
    """Loss scaling for float16 training, static or dynamic.

    The loss is multiplied by `scale` before backward so small gradients survive float16; gradients are
    divided by it again before clipping and the optimizer step. If any gradient is not finite, the update
    is skipped by dropping every gradient (optimizers leave parameters without `.grad` untouched), and a
    dynamic scaler halves its scale; after `growth_interval` clean updates it doubles it again.
    """

    def __init__(self, scale: float, dynamic: bool, growth_interval: int = 2000, min_scale: float = 1.0):
        self.scale = float(scale)
        self.dynamic = dynamic
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.clean_updates = 0
        self.skipped_updates = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale_or_skip(self, parameters: Iterable[torch.nn.Parameter]) -> bool:
        """Unscale gradients in place; on overflow drop them so the coming update is skipped. Returns skipped."""
        params = [p for p in parameters if p.grad is not None]
        if not params:
            return False
        found_inf = torch.zeros(1, device=params[0].grad.device)
        inv_scale = torch.full((1,), 1.0 / self.scale, device=found_inf.device)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for p in params:
            by_device.setdefault(p.grad.device, []).append(p.grad)
        for device, grads in by_device.items():
            device_inf = torch.zeros(1, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, device_inf, inv_scale.to(device))
            found_inf += device_inf.to(found_inf.device)
        overflow = bool(found_inf.item())  # the one host sync per update that loss scaling needs
        if overflow:
            for p in params:
                p.grad = None
        self._update(overflow)
        return overflow

    def _update(self, overflow: bool) -> None:
        if overflow:
            self.skipped_updates += 1
            self.clean_updates = 0
            if self.dynamic:
                self.scale = max(self.scale / 2.0, self.min_scale)
            logger.warning(
                "float16 gradients overflowed: weight update skipped (loss scale %s%s)",
                self.scale,
                ", halved" if self.dynamic else "; consider a smaller --loss_scaling or --auto_loss_scaling",
            )
            return
        self.clean_updates += 1
        if self.dynamic and self.clean_updates % self.growth_interval == 0:
            self.scale *= 2.0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_updates": self.clean_updates, "skipped_updates": self.skipped_updates}

    def load_state_dict(self, state: dict) -> None:
        self.scale = state["scale"]
        self.clean_updates = state["clean_updates"]
        self.skipped_updates = state["skipped_updates"]


@dataclass
class Precision:
    """What precision a run uses; `autocast()` is a no-op context in float32."""

    device_type: str
    compute_dtype: torch.dtype
    reason: str
    loss_scaler: Optional[LossScaler] = None

    @classmethod
    def for_run(
        cls,
        device: torch.device,
        fp32: bool,
        requested: Optional[str],
        loss_scaling: Optional[float],
        auto_loss_scaling: bool,
    ) -> "Precision":
        dtype, reason = choose_compute_dtype(device, fp32, requested)
        scaler = None
        if dtype == torch.float16:
            if loss_scaling is None:
                # Without a given scale float16 gradients underflow; start high and let it adapt.
                scaler = LossScaler(2.0**16, dynamic=True)
            else:
                scaler = LossScaler(loss_scaling, dynamic=auto_loss_scaling)
        elif loss_scaling is not None or auto_loss_scaling:
            logger.info("Loss scaling is only needed in float16; ignored in %s.", str(dtype).replace("torch.", ""))
        return cls(device.type, dtype, reason, scaler)

    @property
    def name(self) -> str:
        return str(self.compute_dtype).replace("torch.", "")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.compute_dtype)

    def describe(self) -> str:
        text = f"{self.name} ({self.reason})"
        if self.loss_scaler is not None:
            kind = "dynamic" if self.loss_scaler.dynamic else "static"
            text += f", {kind} loss scale {self.loss_scaler.scale:g}"
        return text
