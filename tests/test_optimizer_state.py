"""Where optimizer state lives: host memory (offload) and shards over the processes (ZeRO stage 1)."""

import copy
import os

import pytest
import torch
import torch.distributed as dist

import ipu_trainer.training.optimizer_state as optimizer_state_module
from ipu_trainer import IPUConfig, IPUTrainer, IPUTrainingArguments
from ipu_trainer.training.optimizer_state import HostOffloadedOptimizer, ShardedOptimizer
from ipu_trainer.training.optimizers import Lamb
from tiny import tiny_bert


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))


@pytest.mark.parametrize("optimizer_class, kwargs", [(torch.optim.AdamW, {"weight_decay": 0.01}),
                                                     (Lamb, {"weight_decay": 0.01, "bias_correction": False})])
def test_host_offloaded_optimizer_makes_the_same_updates(optimizer_class, kwargs):
    plain_model, offloaded_model = tiny_model(), tiny_model()
    plain = optimizer_class(plain_model.parameters(), lr=0.01, **kwargs)
    offloaded = HostOffloadedOptimizer(offloaded_model.parameters(), optimizer_class=optimizer_class, lr=0.01, **kwargs)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (step + 1)) for o in (plain, offloaded)]
    data = torch.randn(5, 8, 6)
    for step, inputs in enumerate(data):
        for model, optimizer, schedule in zip((plain_model, offloaded_model), (plain, offloaded), schedules):
            model(inputs).square().mean().backward()
            if step == 2:
                model[0].weight.grad = None  # a parameter without gradient is left alone
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
    for expected, got in zip(plain_model.parameters(), offloaded_model.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert offloaded.param_groups[0]["lr"] == plain.param_groups[0]["lr"]
    assert all(t.device.type == "cpu" for state in offloaded.state.values() for t in state.values() if torch.is_tensor(t))

    # A checkpoint of the offloaded optimizer resumes identically.
    restored_model = copy.deepcopy(offloaded_model)
    restored = HostOffloadedOptimizer(restored_model.parameters(), optimizer_class=optimizer_class, lr=0.01, **kwargs)
    restored.load_state_dict(copy.deepcopy(offloaded.state_dict()))  # as if through a checkpoint file
    assert restored.param_groups[0]["lr"] == offloaded.param_groups[0]["lr"] != 0.01
    for model, optimizer in ((offloaded_model, offloaded), (restored_model, restored)):
        model(data[0]).square().mean().backward()
        optimizer.step()
    for expected, got in zip(offloaded_model.parameters(), restored_model.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("overflow", [False, True], ids=["finite", "overflow"])
def test_host_offloaded_optimizer_under_the_float16_grad_scaler(overflow):
    """float16 with optimizer_state_offchip in one process, as on a V100 with the seed ipu_config.json: the scaler
    unscales and inf-checks the model's gradients, and the update lands on the host copies and comes back. The
    same GradScaler calls accelerate makes, on CPU tensors."""
    plain_model, offloaded_model = tiny_model(), tiny_model()
    plain = torch.optim.AdamW(plain_model.parameters(), lr=0.01)
    offloaded = HostOffloadedOptimizer(offloaded_model.parameters(), optimizer_class=torch.optim.AdamW, lr=0.01)
    inputs = torch.randn(4, 6)
    for model, optimizer in ((plain_model, plain), (offloaded_model, offloaded)):
        before = [p.detach().clone() for p in model.parameters()]
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        scaler.scale(model(inputs).square().mean()).backward()
        if overflow:
            model[2].bias.grad[0] = float("inf")  # one overflowing float16 gradient
        scaler.unscale_(optimizer)  # what gradient clipping does first
        scaler.step(optimizer)
        scaler.update()
        moved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before)]
        assert not any(moved) if overflow else all(moved)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    for expected, got in zip(plain_model.parameters(), offloaded_model.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    if not overflow:  # the host copies hold the update too (the state of the next one starts from them)
        assert all(len(state) > 0 for state in offloaded.state.values())
        assert set(map(id, offloaded.state)) == set(map(id, offloaded_model.parameters()))


@pytest.mark.cuda
def test_host_offloaded_optimizer_on_a_gpu_keeps_pinned_host_state_and_makes_the_gpu_updates():
    """On a GPU the host copies are pinned (so the non-blocking copies overlap) and every update, under the float16
    GradScaler as on a V100, equals the plain optimizer's on the GPU."""
    plain_model, offloaded_model = tiny_model().cuda(), tiny_model().cuda()
    plain = torch.optim.AdamW(plain_model.parameters(), lr=0.01)
    offloaded = HostOffloadedOptimizer(offloaded_model.parameters(), optimizer_class=torch.optim.AdamW, lr=0.01)
    scalers = [torch.amp.GradScaler("cuda", init_scale=1024.0) for _ in range(2)]
    for inputs in torch.randn(3, 4, 6, device="cuda"):
        for model, optimizer, scaler in zip((plain_model, offloaded_model), (plain, offloaded), scalers):
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(inputs).float().square().mean()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
    for expected, got in zip(plain_model.parameters(), offloaded_model.parameters()):
        assert got.device.type == "cuda"
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    host = [p for group in offloaded.optimizer.param_groups for p in group["params"]]  # the host copies
    assert host and all(p.device.type == "cpu" and p.is_pinned() for p in host)
    assert all(t.device.type == "cpu" for state in offloaded.state.values() for t in state.values() if torch.is_tensor(t))


def test_host_offloaded_optimizer_picks_up_weights_loaded_after_it_was_built():
    model = tiny_model()
    optimizer = HostOffloadedOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)  # e.g. a checkpoint loaded into the model
    model(torch.randn(2, 6)).sum().backward()
    optimizer.step()  # lr 0: the parameters must stay what was loaded
    assert all(torch.all(p == 0.5) for p in model.parameters())


def test_host_offloaded_optimizer_waits_for_its_copies_before_the_host_update(monkeypatch):
    model = tiny_model()
    optimizer = HostOffloadedOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1)
    events = []
    monkeypatch.setattr(optimizer_state_module, "wait_for_device_to_host_copies", lambda device: events.append(("wait", device)))
    host_step = optimizer.optimizer.step
    monkeypatch.setattr(optimizer.optimizer, "step", lambda: (events.append("host update"), host_step()))
    model(torch.randn(2, 6)).sum().backward()
    optimizer.step()
    assert events == [("wait", torch.device("cpu")), "host update"]


def test_waiting_for_copies_to_the_host_synchronizes_a_gpu_only(monkeypatch):
    synchronized = []
    monkeypatch.setattr(torch.cuda, "synchronize", synchronized.append)
    optimizer_state_module.wait_for_device_to_host_copies(torch.device("cpu"))
    optimizer_state_module.wait_for_device_to_host_copies(torch.device("cuda", 1))
    assert synchronized == [torch.device("cuda", 1)]


# ---- ShardedOptimizer in this process: a process group of one, where this process holds every shard ----------


@pytest.fixture
def process_group(tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def offloaded_adamw(params, **kwargs):
    return HostOffloadedOptimizer(params, optimizer_class=torch.optim.AdamW, **kwargs)


def parameter_groups(model):
    named = list(model.named_parameters())
    return [{"params": [p for name, p in named if name.endswith("weight")], "weight_decay": 0.01},
            {"params": [p for name, p in named if not name.endswith("weight")], "weight_decay": 0.0}]


def state_of_each_parameter(optimizer, model):
    """The optimizer's state of each of the model's parameters, in the model's order."""
    # model_parameters() lists the model's parameters in the order of param_groups (host copies for offload).
    own = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"]]
    by_parameter = dict(zip(map(id, optimizer_state_module.model_parameters(optimizer)), own, strict=True))
    return [by_parameter[id(p)] for p in model.parameters()]


@pytest.mark.parametrize("optimizer_class, kwargs", [
    (torch.optim.AdamW, {}), (torch.optim.AdamW, {"fused": True}), (Lamb, {"bias_correction": False}),
    (offloaded_adamw, {}),
], ids=["adamw", "fused-adamw", "lamb", "offloaded-adamw"])
def test_a_shard_loads_its_state_as_the_unsharded_optimizer_loads_it(process_group, optimizer_class, kwargs):
    # The state of a few updates, saved from a float64 copy of the model: loading casts moments to the parameters'
    # dtype, the optimizer class decides where `step` goes.
    source_model = tiny_model().double()
    source = optimizer_class(parameter_groups(source_model), lr=0.01, **kwargs)
    for inputs in torch.randn(2, 4, 6, dtype=torch.float64):
        source_model(inputs).square().mean().backward()
        source.step()
    saved = copy.deepcopy(source.state_dict())
    saved["param_groups"][0]["lr"] = 0.005  # e.g. where the schedule had got to

    plain_model, sharded_model = tiny_model(), tiny_model()
    plain = optimizer_class(parameter_groups(plain_model), lr=0.01, **kwargs)
    plain.load_state_dict(copy.deepcopy(saved))
    sharded = ShardedOptimizer(parameter_groups(sharded_model), optimizer_class=optimizer_class, lr=0.01, **kwargs)
    sharded.load_state_dict(copy.deepcopy(saved))

    assert [g["lr"] for g in sharded.optim.param_groups] == [g["lr"] for g in sharded.param_groups] == [0.005, 0.01]
    assert not sharded.state  # the shard's state is held once, by the shard's optimizer
    expected_states = state_of_each_parameter(plain, plain_model)
    for expected, got in zip(expected_states, state_of_each_parameter(sharded.optim, sharded_model), strict=True):
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            if not torch.is_tensor(value):
                assert got[name] == value
                continue
            assert (got[name].dtype, got[name].device) == (value.dtype, value.device), name
            assert torch.equal(got[name], value), name


def test_a_consolidated_state_is_handed_out_once_then_the_local_shard(process_group):
    model = tiny_model()
    sharded = ShardedOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=0.01)
    model(torch.randn(2, 6)).sum().backward()
    sharded.step()
    assert set(sharded.state_dict()) == {"local_shard"}  # e.g. accelerate moving the state to the device
    optimizer_state_module.prepare_optimizer_for_checkpoint(sharded, torch.device("cpu"))
    whole = sharded.state_dict()
    assert sorted(whole["state"]) == list(range(len(list(model.parameters()))))
    assert set(sharded.state_dict()) == {"local_shard"}  # the consolidated copy goes stale with the next update


def test_private_zero_consolidated_copies_are_released(process_group):
    """Touchpoint `release_consolidated_copies`: ZeroRedundancyOptimizer keeps consolidated shards in `_all_state_dicts`."""
    model = tiny_model()
    sharded = ShardedOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=0.01)
    model(torch.randn(2, 6)).sum().backward()
    sharded.step()
    sharded.consolidate_state_dict(to=0)
    assert isinstance(sharded._all_state_dicts, list) and len(sharded._all_state_dicts) == 1, (
        "torch no longer keeps consolidated shards in ZeroRedundancyOptimizer._all_state_dicts: "
        "update release_consolidated_copies in ipu_trainer/training/optimizer_state.py"
    )
    sharded.state_dict()
    assert sharded._all_state_dicts == []


def test_a_checkpoint_waits_for_the_gpu_copies_of_the_consolidated_state_before_writing(process_group, tmp_path,
                                                                                      monkeypatch):
    model = tiny_bert()
    sharded = ShardedOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(sharded, lambda step: 1.0)
    args = IPUTrainingArguments(output_dir=str(tmp_path / "out"), fp32=True, report_to=[], use_cpu=True)
    trainer = IPUTrainer(model=model, ipu_config=IPUConfig(layers_per_ipu=[-1]), args=args,
                         optimizers=(sharded, schedule))
    events = []
    consolidate = ShardedOptimizer.consolidate_state_dict
    monkeypatch.setattr(ShardedOptimizer, "consolidate_state_dict",
                        lambda self, to=0: (events.append("consolidate"), consolidate(self, to)))
    monkeypatch.setattr(IPUTrainingArguments, "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("synchronize", device)))
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, path, *a, **k: (events.append(os.path.basename(path)),
                                                                   save(obj, path, *a, **k)))
    trainer._save_optimizer_and_scheduler(str(tmp_path))
    assert events[:3] == ["consolidate", ("synchronize", torch.device("cuda", 0)), "optimizer.pt"]
