"""Device models (`--device_model NAME`): a CPU run that takes every decision a given NVIDIA GPU would.

The IPU examples could be tried on the IPU Model, a simulator that ran the IPU's code paths on the host. The
answer here for GPUs: with `--device_model V100` the run stays on the CPU (gloo under torchrun, every process
modelling the same GPU) while every choice that depends on the GPU is that GPU's: the precision (float16 with
loss scaling where it has no bfloat16 tensor cores, bfloat16 where it has), the optimizer state in host memory
for `optimizer_state_offchip` with its copies, padding to multiples of 8 in half precision, and MFU against
its datasheet peak. The code paths run (the GradScaler, the offloading optimizer, ZeRO over gloo); no CUDA
kernel does, so the model says nothing about a GPU's speed, memory or numerics.

The run resolves its device model once (`ResolvedRun.device_model`); every decision reads it there. The
models are the GPUs of `ipu_trainer.training.mfu`'s table (tests/test_device_model.py checks that each has
its row there and that the two agree on bfloat16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Ampere (compute capability 8.0) brought bfloat16 tensor cores; the GPUs before it emulate bfloat16.
NATIVE_BFLOAT16_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class DeviceModel:
    """One GPU as a run on the CPU models it.

    name: the `--device_model` spelling (matched case-insensitively).
    title: what the start-up log calls it, the row name of `ipu_trainer.training.mfu`'s table.
    device_name: what `torch.cuda.get_device_name()` says on that GPU (the MFU lookup reads it).
    compute_capability: `torch.cuda.get_device_capability()` on that GPU.
    """

    name: str
    title: str
    device_name: str
    compute_capability: tuple[int, int]

    @property
    def native_bfloat16(self) -> bool:
        """What `torch.cuda.is_bf16_supported(including_emulation=False)` answers on that GPU."""
        return self.compute_capability >= NATIVE_BFLOAT16_CAPABILITY

    def describe(self) -> str:
        """The start-up log's line for a modelled run."""
        major, minor = self.compute_capability
        return (f"CPU run modelling an {self.title}: the precision, loss scaling, optimizer state offload and "
                f"sharding, padding and MFU are the choices of {self.device_name!r} (compute capability "
                f"{major}.{minor}); no CUDA kernel runs, so nothing about its speed or memory is measured")


DEVICE_MODELS: tuple[DeviceModel, ...] = (
    DeviceModel("V100", "NVIDIA V100 SXM2", "Tesla V100-SXM2-16GB", (7, 0)),
    DeviceModel("V100-PCIe", "NVIDIA V100 PCIe", "Tesla V100-PCIE-32GB", (7, 0)),
    DeviceModel("V100S", "NVIDIA V100S PCIe", "Tesla V100S-PCIE-32GB", (7, 0)),
    DeviceModel("T4", "NVIDIA T4", "Tesla T4", (7, 5)),
    DeviceModel("A100", "NVIDIA A100", "NVIDIA A100-SXM4-80GB", (8, 0)),
    DeviceModel("A10", "NVIDIA A10", "NVIDIA A10", (8, 6)),
    DeviceModel("A10G", "NVIDIA A10G", "NVIDIA A10G", (8, 6)),
    DeviceModel("RTX3090", "NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 3090", (8, 6)),
    DeviceModel("L4", "NVIDIA L4", "NVIDIA L4", (8, 9)),
    DeviceModel("L40", "NVIDIA L40", "NVIDIA L40", (8, 9)),
    DeviceModel("L40S", "NVIDIA L40S", "NVIDIA L40S", (8, 9)),
    DeviceModel("RTX4090", "NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090", (8, 9)),
    DeviceModel("H100", "NVIDIA H100 SXM", "NVIDIA H100 80GB HBM3", (9, 0)),
    DeviceModel("H100-PCIe", "NVIDIA H100 PCIe", "NVIDIA H100 PCIe", (9, 0)),
    DeviceModel("H100-NVL", "NVIDIA H100 NVL", "NVIDIA H100 NVL", (9, 0)),
    DeviceModel("H200", "NVIDIA H200 SXM", "NVIDIA H200", (9, 0)),
    DeviceModel("H200-NVL", "NVIDIA H200 NVL", "NVIDIA H200 NVL", (9, 0)),
    DeviceModel("GH200", "NVIDIA GH200", "NVIDIA GH200 480GB", (9, 0)),
    DeviceModel("B200", "NVIDIA B200", "NVIDIA B200", (10, 0)),
)


def device_model_named(name: Optional[str]) -> Optional[DeviceModel]:
    """The device model `--device_model name` asks for (any case), None for no name; an unknown name is a
    ValueError listing the known ones."""
    if name is None:
        return None
    for model in DEVICE_MODELS:
        if model.name.lower() == name.strip().lower():
            return model
    raise ValueError(f"--device_model {name} is not a known GPU: choose one of "
                     f"{', '.join(model.name for model in DEVICE_MODELS)}")
