import copy
import io
import math

import pytest
import torch
from torch import nn

from ipu_trainer.training.optimizers import AdamW, Lamb, get_groupbert_schedule

BETAS = (0.9, 0.999)
EPS = 1e-6
LR = 0.05


def reference_lamb_step(weights, grads, states, decays, bias_correction):
    """Textbook LAMB, one parameter at a time, in float64 for a trustworthy reference."""
    b1, b2 = BETAS
    for name, g in grads.items():
        if g is None:
            continue
        w = weights[name]
        state = states.setdefault(name, {"t": 0, "m": torch.zeros_like(w), "v": torch.zeros_like(w)})
        state["t"] += 1
        t = state["t"]
        state["m"] = b1 * state["m"] + (1 - b1) * g
        state["v"] = b2 * state["v"] + (1 - b2) * g * g
        m_hat, v_hat = state["m"], state["v"]
        if bias_correction:
            m_hat, v_hat = m_hat / (1 - b1**t), v_hat / (1 - b2**t)
        update = m_hat / (v_hat.sqrt() + EPS) + decays[name] * w
        w_norm, u_norm = w.norm().item(), update.norm().item()
        trust = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
        weights[name] = w - LR * trust * update


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
    model.register_parameter("unused", nn.Parameter(torch.randn(5)))  # never gets a gradient
    return model


def make_optimizer(model, bias_correction):
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and not n.startswith("1.")]
    no_decay = [p for n, p in model.named_parameters() if not (n.endswith("weight") and not n.startswith("1."))]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    return Lamb(groups, lr=LR, betas=BETAS, eps=EPS, bias_correction=bias_correction)


def compute_grads(model, step):
    generator = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(16, 4, generator=generator), torch.randn(16, 3, generator=generator)
    model.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()
    if step == 2:
        model[3].bias.grad = None  # skipped on one step: its own step count must lag behind


def decays_of(model, optimizer):
    by_param = {p: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {n: by_param[p] for n, p in model.named_parameters()}


@pytest.mark.parametrize("bias_correction", [True, False])
def test_lamb_matches_reference(bias_correction):
    model = make_model()
    optimizer = make_optimizer(model, bias_correction)
    decays = decays_of(model, optimizer)
    weights = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    unused_before = model.unused.detach().clone()
    states = {}
    for step in range(5):
        compute_grads(model, step)
        grads = {n: None if p.grad is None else p.grad.double().clone() for n, p in model.named_parameters()}
        optimizer.step()
        reference_lamb_step(weights, grads, states, decays, bias_correction)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), weights[name].float(), rtol=1e-6, atol=1e-7, msg=name)
    assert torch.equal(model.unused, unused_before)
    assert model.unused not in optimizer.state
    assert optimizer.state[model[3].bias]["step"] == 4
    assert optimizer.state[model[0].weight]["step"] == 5


def test_bias_correction_changes_the_result():
    results = []
    for bias_correction in (True, False):
        model = make_model()
        optimizer = make_optimizer(model, bias_correction)
        for step in range(3):
            compute_grads(model, step)
            optimizer.step()
        results.append(model[0].weight.detach().clone())
    assert not torch.allclose(results[0], results[1])


def test_step_without_grads_changes_nothing():
    model = make_model()
    optimizer = make_optimizer(model, bias_correction=True)
    compute_grads(model, 0)
    optimizer.step()
    snapshot = copy.deepcopy(optimizer.state_dict())
    weights = copy.deepcopy(model.state_dict())
    model.zero_grad(set_to_none=True)  # what the trainer does after an fp16 overflow
    optimizer.step()
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name])
    for key, state in optimizer.state_dict()["state"].items():
        assert state["step"] == snapshot["state"][key]["step"] == 1
        assert torch.equal(state["exp_avg"], snapshot["state"][key]["exp_avg"])


def test_state_dict_resumes_identically():
    model = make_model()
    optimizer = make_optimizer(model, bias_correction=False)
    for step in range(3):
        compute_grads(model, step)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    for step in range(3, 6):
        compute_grads(model, step)
        optimizer.step()

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = make_model()
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = make_optimizer(resumed, bias_correction=False)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    for step in range(3, 6):
        compute_grads(resumed, step)
        resumed_optimizer.step()
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_low_precision_params_keep_float32_state():
    param = nn.Parameter(torch.randn(10, dtype=torch.bfloat16))
    optimizer = Lamb([param], lr=0.01)
    param.grad = torch.randn(10, dtype=torch.bfloat16)
    optimizer.step()
    assert optimizer.state[param]["exp_avg_sq"].dtype == torch.float32
    saved = copy.deepcopy(optimizer.state_dict())
    fresh = Lamb([param], lr=0.01)
    fresh.load_state_dict(saved)
    for key in ("exp_avg", "exp_avg_sq"):
        assert fresh.state[param][key].dtype == torch.float32
        assert torch.equal(fresh.state[param][key], saved["state"][0][key])
    assert param.dtype == torch.bfloat16


@pytest.mark.cuda
def test_lamb_on_cuda_matches_cpu():
    cpu_model = make_model()
    cuda_model = copy.deepcopy(cpu_model).cuda()
    cpu_optimizer, cuda_optimizer = make_optimizer(cpu_model, True), make_optimizer(cuda_model, True)
    for step in range(3):
        compute_grads(cpu_model, step)
        for p, q in zip(cpu_model.parameters(), cuda_model.parameters()):
            q.grad = None if p.grad is None else p.grad.cuda()
        cpu_optimizer.step()
        cuda_optimizer.step()
    for p, q in zip(cpu_model.parameters(), cuda_model.parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-5, atol=1e-6)


def test_groupbert_schedule_follows_formula():
    lrs = (0.006, 0.002)
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": lrs[0]}, {"params": [params[1]], "lr": lrs[1]}])
    warmup, total, lr_end = 10, 110, 1e-7
    scheduler = get_groupbert_schedule(optimizer, warmup, total, lr_end=lr_end)
    seen = {}
    for step in range(131):
        seen[step] = scheduler.get_last_lr()
        optimizer.step()
        scheduler.step()
    for lr, got in zip(lrs, zip(*[seen[s] for s in (0, 4, 10, 60, 110, 130)])):
        end = lr_end / lr
        expected = [0.0, math.sqrt(4 / 10), 1.0, 1 + (end - 1) * 0.5, end, end]
        assert list(got) == pytest.approx([lr * m for m in expected], rel=1e-12, abs=1e-15)


def test_groupbert_schedule_without_warmup():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = get_groupbert_schedule(optimizer, 0, 10)
    assert scheduler.get_last_lr() == [pytest.approx(0.1)]
    assert scheduler.lr_lambdas[0](5) == pytest.approx(1 + (1e-6 - 1) * 0.5)
    with pytest.raises(ValueError, match="lr_end=1.0 is invalid"):
        get_groupbert_schedule(optimizer, 0, 10, lr_end=1.0)


# ---- AdamW without bias correction (the original's default optimizer) -----------------------------------------


def uncorrected_adamw(w, grads, lr, wd, betas=BETAS, eps=1e-8):
    """m / (sqrt(v) + eps) + wd * w, no bias correction, in float64."""
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for g in grads:
        m, v = betas[0] * m + (1 - betas[0]) * g, betas[1] * v + (1 - betas[1]) * g * g
        w = w - lr * (m / (v.sqrt() + eps) + wd * w)
    return w


@pytest.mark.parametrize("kernel", [dict(fused=True), dict(foreach=True), dict(foreach=False)])
def test_adamw_without_bias_correction_runs_on_each_of_torchs_kernels(kernel):
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))])  # torch wraps AdamW.step with its hook runner once used
    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.randn(40, generator=generator))
    start = param.detach().double().clone()
    optimizer = AdamW([param], lr=0.01, weight_decay=0.1, bias_correction=False, **kernel)
    updates = []
    optimizer.register_step_post_hook(lambda *args: updates.append(1))
    grads = [torch.randn(40, generator=generator) for _ in range(4)]
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    torch.testing.assert_close(param.detach().double(), uncorrected_adamw(start, [g.double() for g in grads], 0.01, 0.1),
                               rtol=1e-6, atol=1e-6)
    assert len(updates) == 4  # each step hook runs once per update


def test_adamw_without_bias_correction_resumes_any_saved_state_uncorrected():
    param = nn.Parameter(torch.ones(3))
    corrected = torch.optim.AdamW([param], lr=0.01, weight_decay=0.0)
    param.grad = torch.ones(3)
    corrected.step()  # a state whose step counts updates (1)
    resumed = AdamW([param], lr=0.01, weight_decay=0.0, bias_correction=False)
    resumed.load_state_dict(corrected.state_dict())
    state = resumed.state[param]
    m, v = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    before = param.detach().clone()
    resumed.step()
    m, v = 0.9 * m + 0.1, 0.999 * v + 0.001
    torch.testing.assert_close(param.detach(), before - 0.01 * m / (v.sqrt() + 1e-8))

