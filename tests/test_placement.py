"""How the IPU config's batch math is placed on processes."""

import pytest

from ipu_trainer import IncompatibleIPUConfigError, IPUConfig
from ipu_trainer.run.placement import Placement


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
