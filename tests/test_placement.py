"""How the IPU config's batch math is placed on processes, and where optimizer state lives."""

import copy

import pytest
import torch

from ipu_trainer import IncompatibleIPUConfigError, IPUConfig
from ipu_trainer.optimization import Lamb
from ipu_trainer.placement import HostOffloadedOptimizer, Placement


def placement(world_size, replicas=4, accumulation=512, micro=32, device_iterations=1):
    config = IPUConfig(layers_per_ipu=[0, 4, 4, 4], replication_factor=replicas,
                       gradient_accumulation_steps=accumulation, device_iterations=device_iterations)
    return Placement.for_training(config, micro, world_size)


@pytest.mark.parametrize("world_size, per_process", [(1, 2048), (4, 512), (8, 256), (16, 128)])
def test_the_phase_one_recipe_keeps_its_global_batch_on_any_gpu_count(world_size, per_process):
    layout = placement(world_size)
    assert layout.samples_per_update == 65536
    assert layout.micro_batches_per_update == per_process
    assert layout.process_batch_size * world_size == layout.samples_per_step == 65536


def test_device_iterations_multiply_the_step_not_the_update():
    layout = placement(2, replicas=2, accumulation=4, micro=2, device_iterations=2)
    assert (layout.samples_per_update, layout.samples_per_step, layout.process_batch_size) == (16, 32, 16)


def test_processes_that_cannot_share_an_update_are_refused():
    with pytest.raises(IncompatibleIPUConfigError, match=r"2 x .*= 6 micro-batches.*--nproc_per_node 3"):
        placement(4, replicas=2, accumulation=3)


def test_inference_rounds_replicas_up_to_the_processes():
    config = IPUConfig(layers_per_ipu=[-1], inference_replication_factor=3, inference_device_iterations=2)
    layout = Placement.for_inference(config, 4, world_size=2)
    assert layout.process_batch_size == 4 * 2 * 2


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


def test_host_offloaded_optimizer_picks_up_weights_loaded_after_it_was_built():
    model = tiny_model()
    optimizer = HostOffloadedOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)  # e.g. a checkpoint loaded into the model
    model(torch.randn(2, 6)).sum().backward()
    optimizer.step()  # lr 0: the parameters must stay what was loaded
    assert all(torch.all(p == 0.5) for p in model.parameters())
