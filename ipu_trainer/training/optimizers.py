"""The original's optimizers (poptorch's LAMB and AdamW), its parameter groups, and the GroupBERT schedule.

The IPU examples never used torch's optimizers as they are: `--lamb` / `--lamb_no_bias_correction` took
poptorch's LAMB with three parameter groups, and otherwise poptorch's AdamW without bias correction
(`original_parameter_groups`, `Lamb`, `AdamW` here). Both compute, per parameter at its step t:

    m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2
    m_hat, v_hat = m / (1 - b1^t), v / (1 - b2^t)    (or m, v without bias correction)
    update = m_hat / (sqrt(v_hat) + eps) + weight_decay * w
    AdamW: w -= lr * update
    LAMB:  w -= lr * trust * update,  trust = min(||w||, max_weight_norm) / ||update||, 1 where either is 0
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

# poptorch's LAMB clamps ||w|| at the float16 maximum when it is given no max_weight_norm (the original's
# optimizer-wide setting); the original's bias group sets 0, which makes its trust ratio 1 (plain Adam steps).
POPTORCH_MAX_WEIGHT_NORM = 65500.0

# Moments of these dtypes would lose the second-moment update entirely (0.999 * v rounds back to v
# in 8 mantissa bits), so their state and update math run in float32.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class Lamb(Optimizer):
    """LAMB (You et al., 2019) as poptorch computes it: Adam moments scaled per parameter by a trust ratio.

    For each parameter with a gradient, at its own step t (see the module docstring for m_hat, v_hat):
        update = m_hat / (sqrt(v_hat) + eps) + weight_decay * w
        w -= lr * trust * update,  trust = r1 / ||update||,  r1 = min(||w||, max_weight_norm)
    with trust 1 where r1 or ||update|| is 0. `max_weight_norm` is a group setting: None does not clamp,
    0 turns the trust ratio off (the original's bias group).

    Parameters whose `.grad` is None are skipped without touching their state or step count; the
    trainer relies on this to drop an update after an fp16 overflow. State is kept in the parameter
    dtype, except for float16 and bfloat16 parameters, whose moments and update are computed in
    float32 (see _LOW_PRECISION) and whose weights are rounded once at the end.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        max_weight_norm: float | None = None,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr={lr!r} is invalid: must be >= 0")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas={betas!r} is invalid: each must be in [0, 1)")
        if eps < 0:
            raise ValueError(f"eps={eps!r} is invalid: must be >= 0")
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay!r} is invalid: must be >= 0")
        if max_weight_norm is not None and max_weight_norm < 0:
            raise ValueError(f"max_weight_norm={max_weight_norm!r} is invalid: must be >= 0 or None")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        max_weight_norm=max_weight_norm)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    # Private upstream touchpoints: the torch._foreach_* multi-tensor ops below are the kernels torch's own
    # optimizers are built on; there is no public multi-tensor API. The LAMB reference tests in
    # tests/test_optimizers.py fail by name if any of them disappears.
    def _step_group(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs, steps, weights, grads = [], [], [], [], []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("Lamb does not support sparse gradients")
            state = self.state[p]
            compute_dtype = torch.float32 if p.dtype in _LOW_PRECISION else p.dtype
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=compute_dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=compute_dtype, memory_format=torch.preserve_format)
            state["step"] += 1
            steps.append(state["step"])
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            weights.append(p if p.dtype == compute_dtype else p.to(compute_dtype))
            grads.append(p.grad if p.grad.dtype == compute_dtype else p.grad.to(compute_dtype))

        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

        if group["bias_correction"]:
            m_hat = torch._foreach_div(exp_avgs, [1 - beta1**t for t in steps])
            denom = torch._foreach_div(exp_avg_sqs, [1 - beta2**t for t in steps])
            torch._foreach_sqrt_(denom)
        else:
            m_hat = exp_avgs
            denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(m_hat, denom)
        if group["weight_decay"] != 0:
            torch._foreach_add_(updates, weights, alpha=group["weight_decay"])

        weight_norms = torch._foreach_norm(weights)
        if group["max_weight_norm"] is not None:
            weight_norms = torch._foreach_clamp_max(weight_norms, group["max_weight_norm"])
        trust = _trust_ratios(weight_norms, torch._foreach_norm(updates))
        torch._foreach_mul_(updates, trust)
        torch._foreach_add_(weights, updates, alpha=-group["lr"])
        for p, w in zip(params, weights):
            if w is not p:
                p.copy_(w)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter dtype on load, which would round the float32
        # moments of low-precision parameters; restore them from the saved tensors.
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for param_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(param_id)
            if p.dtype in _LOW_PRECISION and saved:
                for key in ("exp_avg", "exp_avg_sq"):
                    self.state[p][key] = saved[key].to(device=p.device, dtype=torch.float32, copy=True)


# A step count at which 1 - beta^t is exactly 1.0 for every beta < 1 (the largest float64 below 1 is 1 - 1.1e-16,
# and (1 - 1.1e-16)^(2^100) underflows to 0 in float32 and float64 alike), and that stays put when torch adds 1
# (2^100 + 1 rounds back to 2^100 in float32, the dtype of torch's step counters).
_STEP_WITHOUT_BIAS_CORRECTION = 2.0**100


class AdamW(torch.optim.AdamW):
    """poptorch's AdamW: decoupled weight decay, with or without bias correction of the moments.

    With bias correction it is torch's AdamW (torch's w *= 1 - lr * wd before the Adam step is the same
    update as poptorch's lr * (m_hat / (sqrt(v_hat) + eps) + wd * w)). Without it (the original's setting,
    `bias_correction=False`), torch's kernels still run, fused or foreach, with each parameter's step count
    held at 2^100: there 1 - b1^t and 1 - b2^t are exactly 1.0, so the kernels compute m / (sqrt(v) + eps)
    bit for bit as the formula without correction does. The state then records 2^100 as its `step`; it does
    not count updates (the trainer's state does).
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, bias_correction: bool = True, **kwargs: Any) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
        self.bias_correction = bias_correction
        if not bias_correction:
            # A hook rather than an override of step(): torch wraps each optimizer class's step() with the hook
            # runner, so an override calling super().step() would run every step hook twice.
            self.register_step_pre_hook(_hold_step_counts)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if not self.bias_correction:  # e.g. a checkpoint of a corrected AdamW, whose counts run from 1
            for state in self.state.values():
                if "step" in state:
                    state["step"].fill_(_STEP_WITHOUT_BIAS_CORRECTION)


def _hold_step_counts(optimizer: AdamW, args: Any, kwargs: Any) -> None:
    """Before each update, a parameter about to be updated for the first time gets its state with the held step
    count, made as torch's AdamW makes it (zero moments; a float32 step on the parameter's device for the fused and
    capturable kernels, on the CPU otherwise), so that even its first update is uncorrected. Existing counts stay
    held by themselves (torch adds 1 to 2^100)."""
    for group in optimizer.param_groups:
        on_device = group["fused"] or group["capturable"]
        for p in group["params"]:
            if p.grad is None or "step" in optimizer.state[p]:
                continue
            state = optimizer.state[p]
            state["step"] = torch.tensor(
                _STEP_WITHOUT_BIAS_CORRECTION, dtype=torch.float32, device=p.device if on_device else None
            )
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def original_parameter_groups(model: torch.nn.Module, weight_decay: float, lamb: bool) -> list[dict[str, Any]]:
    """The original trainer's parameter groups.

    Weight decay goes to every parameter that is neither inside an `nn.LayerNorm` nor named `*bias*`. With
    LAMB the biases form a group of their own with max_weight_norm 0 (their trust ratio is 1: the original
    disabled LAMB's scaling for them) and the rest (LayerNorm weights) a third group; with AdamW the biases
    and LayerNorm weights share the no-decay group. Tied parameters appear once, under their first name.
    """
    in_layer_norm = {
        id(param) for module in model.modules() if isinstance(module, torch.nn.LayerNorm)
        for param in module.parameters(recurse=False)
    }
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    decay = [param for name, param in named if "bias" not in name and id(param) not in in_layer_norm]
    if not lamb:  # the rest in the model's order, as the original listed them
        decayed = {id(param) for param in decay}
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": [param for _, param in named if id(param) not in decayed], "weight_decay": 0.0}]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": [param for name, param in named if "bias" in name], "weight_decay": 0.0, "max_weight_norm": 0.0},
        {"params": [param for name, param in named if "bias" not in name and id(param) in in_layer_norm],
         "weight_decay": 0.0},
    ]


def _trust_ratios(weight_norms: list[torch.Tensor], update_norms: list[torch.Tensor]) -> list[torch.Tensor]:
    """r1 / ||update|| per parameter, 1 where either is 0; one vectorised op per device."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, norm in enumerate(weight_norms):
        by_device[norm.device].append(i)
    ratios: list[torch.Tensor] = [None] * len(weight_norms)  # type: ignore[list-item]
    for indices in by_device.values():
        w = torch.stack([weight_norms[i] for i in indices])
        u = torch.stack([update_norms[i] for i in indices])
        ratio = torch.where((w > 0) & (u > 0), w / u, torch.ones_like(w))
        for i, r in zip(indices, ratio.unbind()):
            ratios[i] = r
    return ratios


def get_groupbert_schedule(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    lr_end: float = 1e-7,
    last_epoch: int = -1,
) -> LambdaLR:
    """GroupBERT schedule: square-root warmup, then linear decay to `lr_end`.

    With w = num_warmup_steps, T = num_training_steps and lr each group's initial learning rate,
    the multiplier at step s is (s / w) ** 0.5 for s < w, then falls linearly from 1 at s = w to
    lr_end / lr at s = T, and stays at lr_end / lr afterwards.
    """
    if num_warmup_steps < 0:
        raise ValueError(f"num_warmup_steps={num_warmup_steps!r} is invalid: must be >= 0")
    if num_training_steps < 1:
        raise ValueError(f"num_training_steps={num_training_steps!r} is invalid: must be >= 1")

    def multiplier_for(initial_lr: float) -> Callable[[int], float]:
        if initial_lr == 0:
            return lambda step: 0.0
        if lr_end > initial_lr:
            raise ValueError(f"lr_end={lr_end!r} is invalid: must not exceed the initial lr={initial_lr!r}")
        end = lr_end / initial_lr

        def multiplier(step: int) -> float:
            if step < num_warmup_steps:
                return (step / num_warmup_steps) ** 0.5
            if step >= num_training_steps:
                return end
            progress = (step - num_warmup_steps) / (num_training_steps - num_warmup_steps)
            return 1.0 + (end - 1.0) * progress

        return multiplier

    lambdas = [multiplier_for(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]
    return LambdaLR(optimizer, lambdas, last_epoch=last_epoch)
