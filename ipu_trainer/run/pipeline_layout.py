"""`--pipeline`: where each replica's pipeline stages run, decided before any weights or data are loaded.

On the IPU a replica is `ipus_per_replica` devices, its layers placed as `layers_per_ipu` says, and the micro-batches
of each weight update flow through them. With `--pipeline` and `torchrun` on W processes, each replica's stages are
`ipus_per_replica` = P processes, and the W / P = D groups of P processes are data-parallel replicas of the pipeline:
process r runs stage `r % P` of data-parallel group `r // P` (so the first P processes are one whole pipeline).

The batch arithmetic is the one of D data-parallel processes without pipelining (`Placement` with `world_size=D`):
one weight update averages `replication_factor x gradient_accumulation_steps` micro-batches, each group runs
`replication_factor x gradient_accumulation_steps / D` of them, and those are the pipeline's micro-batches. Each of
the W processes still reads 1/W of the step batch from its dataloader; a group's P processes put their parts together,
so the group holds the batch one unpipelined process of D would hold.

Evaluation runs through its own stages where `inference_ipus_per_replica` / `inference_layers_per_ipu` differ
(W must be a multiple of both), or, with `inference_ipus_per_replica` 1, the whole model in every process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from ..config.ipu_config import IPUConfig

if TYPE_CHECKING:
    from .training_args import IPUTrainingArguments

# --pipeline's schedules: torch.distributed.pipelining's single-stage-per-process ones. GPipe runs every micro-batch's
# forward before any backward (it holds all their activations); 1F1B holds at most P of them.
SCHEDULES = ("1F1B", "GPipe")
DEFAULT_SCHEDULE = "1F1B"
# model_type of the models `ipu_trainer.models.stages` can cut into stages (the classes the scripts build for them).
PIPELINED_MODEL_TYPES = ("bert", "roberta", "gpt2")


def bubble_fraction(schedule: str, stages: int, micro_batches: int) -> float:
    """The share of a stage's time spent idle in one update, for a schedule of single-stage processes with equal
    stages: (P - 1) / (m + P - 1) for both GPipe and 1F1B (1F1B saves memory, not time)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    return (stages - 1) / (micro_batches + stages - 1)


@dataclass(frozen=True)
class PipelineLayout:
    """The processes of a pipelined run: `stages` per pipeline, `world_size // stages` data-parallel pipelines."""

    schedule: str
    stages: int
    layers_per_stage: tuple[int, ...]
    eval_stages: int
    eval_layers_per_stage: tuple[int, ...]
    world_size: int

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.stages

    def stage_of(self, rank: int, for_inference: bool = False) -> int:
        return rank % (self.eval_stages if for_inference else self.stages)

    def group_of(self, rank: int, for_inference: bool = False) -> int:
        return rank // (self.eval_stages if for_inference else self.stages)

    def describe(self, micro_batches: int) -> list[str]:
        lines = [
            f"pipeline: {self.stages} stages per replica (layers per stage {list(self.layers_per_stage)}, the "
            f"embeddings with the first, the heads with the last), {self.data_parallel} data-parallel pipeline(s) over "
            f"{self.world_size} processes; schedule {self.schedule}, {micro_batches} micro-batches per update, "
            f"bubble {bubble_fraction(self.schedule, self.stages, micro_batches):.0%} of each stage's time",
        ]
        if (self.eval_stages, self.eval_layers_per_stage) != (self.stages, self.layers_per_stage):
            where = ("the whole model in every process" if self.eval_stages == 1 else
                     f"{self.eval_stages} stages, layers per stage {list(self.eval_layers_per_stage)}")
            lines.append(f"evaluation: {where} (inference_ipus_per_replica / inference_layers_per_ipu)")
        return lines


def refuse_with_pipeline(flag: str, why: str) -> ValueError:
    return ValueError(f"--pipeline with {flag} is not supported: {why}")


def resolve_pipeline(
    args: IPUTrainingArguments, ipu_config: IPUConfig, model_config: Any, num_layers: Optional[int]
) -> Optional[PipelineLayout]:
    """The layout of a `--pipeline` run (None without the flag), or one ValueError naming what cannot be pipelined."""
    schedule = getattr(args, "pipeline", None)
    if schedule is None:
        return None
    if schedule not in SCHEDULES:
        raise ValueError(f"--pipeline {schedule}: unknown schedule; choose one of {', '.join(SCHEDULES)} "
                         f"(--pipeline alone is {DEFAULT_SCHEDULE})")
    stages = ipu_config.ipus_per_replica
    eval_stages = ipu_config.inference_ipus_per_replica
    world_size = args.world_size
    if stages < 2:
        raise ValueError(f"--pipeline needs ipus_per_replica >= 2 (one process per pipeline stage), got "
                         f"ipus_per_replica={stages}: set layers_per_ipu with one entry per stage, e.g. "
                         "--ipu_config_overrides \"layers_per_ipu=[6 6],ipus_per_replica=2\"")
    if world_size % stages or world_size % eval_stages:
        fitting = stages * eval_stages // _gcd(stages, eval_stages)
        which = (f"ipus_per_replica={stages}" if world_size % stages else
                 f"inference_ipus_per_replica={eval_stages}")
        raise ValueError(f"--pipeline: {world_size} process(es) cannot hold whole pipelines of {which} stages: start "
                         f"a multiple of {fitting} processes (torchrun --nproc_per_node {fitting} ...)")
    if schedule == "GPipe" and world_size // stages > 1:
        # torch 2.13's DDP reducer fails an internal assert on the second update under ScheduleGPipe (its bucket
        # rebuild counts every parameter twice); 1F1B runs the same update with DDP, and holds fewer activations.
        raise refuse_with_pipeline("GPipe and several data-parallel pipelines", "DDP fails under torch's GPipe schedule "
                                   "(an internal assert of its reducer); use --pipeline 1F1B, the same update")
    model_type = getattr(model_config, "model_type", None)
    if model_config is not None and model_type not in PIPELINED_MODEL_TYPES:
        raise ValueError(f"--pipeline cannot cut model type {model_type!r} into stages; supported: "
                         f"{', '.join(PIPELINED_MODEL_TYPES)}")
    if args.fsdp:
        raise refuse_with_pipeline("--fsdp", "each stage is one process's; drop one of them")
    if ipu_config.replicated_tensor_sharding and world_size // stages > 1:
        raise refuse_with_pipeline("replicated_tensor_sharding=true", "the optimizer state of a stage is not sharded "
                                   "over its data-parallel processes; set replicated_tensor_sharding=false")
    if args.dataloader_drop_last is False:
        raise refuse_with_pipeline("--dataloader_drop_last False", "every update must have all its micro-batches")
    if args.torch_compile:
        raise refuse_with_pipeline("--torch_compile", "the stages run uncompiled")
    if num_layers is None:
        raise ValueError("--pipeline: the model config does not say how many layers it has")
    layers = tuple(ipu_config.resolved_layers_per_ipu(num_layers, for_inference=False))
    eval_layers = tuple(ipu_config.resolved_layers_per_ipu(num_layers, for_inference=True))
    return PipelineLayout(schedule, stages, layers, eval_stages, eval_layers, world_size)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
