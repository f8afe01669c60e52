"""LAMB and the GroupBERT learning-rate schedule used by the pretraining examples."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

# Moments of these dtypes would lose the second-moment update entirely (0.999 * v rounds back to v
# in 8 mantissa bits), so their state and update math run in float32.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class Lamb(Optimizer):
    """LAMB (You et al., 2019): Adam moments scaled per parameter by a trust ratio.

    For each parameter with a gradient, at its own step t:
        m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2
        m_hat, v_hat = m / (1 - b1^t), v / (1 - b2^t)    (or m, v without bias correction)
        update = m_hat / (sqrt(v_hat) + eps) + weight_decay * w
        w -= lr * trust * update,  trust = ||w|| / ||update|| if both norms > 0 else 1

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
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr={lr!r} is invalid: must be >= 0")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas={betas!r} is invalid: each must be in [0, 1)")
        if eps < 0:
            raise ValueError(f"eps={eps!r} is invalid: must be >= 0")
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay!r} is invalid: must be >= 0")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction)
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
    # tests/test_optimization.py fail by name if any of them disappears.
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

        trust = _trust_ratios(torch._foreach_norm(weights), torch._foreach_norm(updates))
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


def _trust_ratios(weight_norms: list[torch.Tensor], update_norms: list[torch.Tensor]) -> list[torch.Tensor]:
    """||w|| / ||update|| per parameter, 1 where either norm is 0; one vectorised op per device."""
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
