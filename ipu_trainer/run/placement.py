"""How an IPU config's batch arithmetic is placed on the processes and devices at hand.

An IPU run is described by micro batch, gradient accumulation, replicas and device iterations. Those
numbers fix the math: one weight update averages the gradients of `replication_factor *
gradient_accumulation_steps` micro-batches, and one step performs `device_iterations` updates. Here
replicas become data-parallel processes (`torchrun`), and replicas that have no process of their own
are emulated by accumulating their micro-batches in a process that does; the average is the same.

With W processes (`torchrun --nproc_per_node W`), the `replicas x accumulation` micro-batches of one
update are shared out evenly: each process runs `replicas x accumulation / W` of them and averages
their losses, and the gradient all-reduce averages the processes. So W must divide
`replicas x accumulation`: W = replicas gives the IPU layout, a divisor of it hosts several replicas
per process, and a multiple of it splits each replica's accumulation over several processes.

With `--pipeline` (`run.pipeline_layout`), `world_size` counts the data-parallel pipelines and `pipeline_stages`
the processes of each: a pipeline runs its share of micro-batches as one process would, and each of its processes
reads 1/`pipeline_stages` of the pipeline's batch from its dataloader.
"""

from __future__ import annotations

from dataclasses import dataclass


from ..config.ipu_config import IncompatibleIPUConfigError, IPUConfig


@dataclass(frozen=True)
class Placement:
    micro_batch_size: int
    replication_factor: int
    gradient_accumulation_steps: int
    device_iterations: int
    world_size: int = 1
    pipeline_stages: int = 1  # processes per data-parallel process (--pipeline); they share its dataloader reads

    @classmethod
    def for_training(
        cls, ipu_config: IPUConfig, micro_batch_size: int, world_size: int, pipeline_stages: int = 1
    ) -> "Placement":
        placement = cls(
            micro_batch_size=micro_batch_size,
            replication_factor=ipu_config.replication_factor,
            gradient_accumulation_steps=ipu_config.gradient_accumulation_steps,
            device_iterations=ipu_config.device_iterations,
            world_size=world_size,
            pipeline_stages=pipeline_stages,
        )
        placement.check()
        return placement

    @classmethod
    def for_inference(cls, ipu_config: IPUConfig, micro_batch_size: int, world_size: int) -> "Placement":
        # Inference has no accumulation and no weight update, so the batch size does not change the numbers:
        # replicas are rounded up to a multiple of the processes rather than refused.
        replicas = -(-ipu_config.inference_replication_factor // world_size) * world_size
        return cls(
            micro_batch_size=micro_batch_size,
            replication_factor=replicas,
            gradient_accumulation_steps=1,
            device_iterations=ipu_config.inference_device_iterations,
            world_size=world_size,
        )

    def check(self) -> None:
        micro_batches = self.replication_factor * self.gradient_accumulation_steps
        if micro_batches % self.world_size:
            fitting = max(d for d in range(1, self.world_size + 1) if micro_batches % d == 0)
            raise IncompatibleIPUConfigError(
                f"incompatible placement: one weight update averages replication_factor={self.replication_factor} x "
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} = {micro_batches} micro-batches, which "
                f"{self.world_size} processes cannot share evenly; start a number of processes that divides "
                f"{micro_batches} (e.g. torchrun --nproc_per_node {fitting}) or change replication_factor, --n_ipu "
                "or --gradient_accumulation_steps"
            )
        if (self.samples_per_step // self.world_size) % self.pipeline_stages:
            raise IncompatibleIPUConfigError(
                f"incompatible placement: each pipeline's step batch of {self.samples_per_step // self.world_size} "
                f"samples cannot be read in {self.pipeline_stages} equal parts by its {self.pipeline_stages} stage "
                "processes; make --per_device_train_batch_size x gradient_accumulation_steps a multiple of "
                f"ipus_per_replica={self.pipeline_stages}"
            )

    @property
    def micro_batches_per_update(self) -> int:
        """Micro-batches one process runs, forward and backward, before each weight update."""
        return self.replication_factor * self.gradient_accumulation_steps // self.world_size

    @property
    def samples_per_update(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.replication_factor

    @property
    def samples_per_step(self) -> int:
        return self.samples_per_update * self.device_iterations

    @property
    def process_batch_size(self) -> int:
        """Samples one process takes from its dataloader per step."""
        return self.samples_per_step // (self.world_size * self.pipeline_stages)

    def describe(self) -> list[str]:
        unit, one = ("pipelines", "pipeline") if self.pipeline_stages > 1 else ("processes", "process")
        replicas = f"{self.replication_factor}"
        if self.world_size == 1:
            replicas += " (emulated by accumulation in this process)" if self.replication_factor > 1 else ""
        elif self.replication_factor % self.world_size == 0:
            per_process = self.replication_factor // self.world_size
            replicas += f" over {self.world_size} {unit} ({per_process} per {one}"
            replicas += ", emulated by accumulation)" if per_process > 1 else ")"
        else:
            replicas += f" over {self.world_size} {unit} (each replica's accumulation split across {unit})"
        processes = f"data-parallel processes: {self.world_size}"
        if self.pipeline_stages > 1:
            processes = f"data-parallel pipelines: {self.world_size} (each {self.pipeline_stages} processes)"
        return [
            processes,
            f"replicas: {replicas}",
            f"micro batch: {self.micro_batch_size}, gradient accumulation: {self.gradient_accumulation_steps}, "
            f"device iterations: {self.device_iterations}",
            f"micro-batches per weight update per {one}: {self.micro_batches_per_update} "
            "(gradients all-reduced once per update)" if self.world_size > 1 else
            f"micro-batches per weight update: {self.micro_batches_per_update}",
            f"samples per weight update: {self.samples_per_update} "
            f"(micro {self.micro_batch_size} x accumulation {self.gradient_accumulation_steps} "
            f"x replicas {self.replication_factor})",
            f"samples per step: {self.samples_per_step} ({self.device_iterations} weight update(s) per step)",
        ]
