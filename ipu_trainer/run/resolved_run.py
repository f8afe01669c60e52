"""The run, resolved once from the IPU config and the arguments.

Everything a run's numbers depend on is decided here, in one place, before any weights or data are
loaded: the effective IPU config, its check against the model's layer count, the training and
evaluation placements, the device model (`--device_model`: a CPU run deciding as a given GPU), the
precision and the dataloader workers (the one warmup formula is
`training_args.warmup_steps_for`, which `IPUTrainingArguments.get_warmup_steps` applies for every schedule). The
scripts call `resolve_run` once and hand the result to `IPUTrainer`; an `IPUTrainer` built directly from
an `IPUConfig` (as code written for optimum-graphcore does) resolves it itself.

The user's `IPUTrainingArguments` are never changed. The upstream training loop sees different numbers
(one dataloader batch per step, no accumulation of its own, the precision chosen here): those live in
a copy, `ResolvedRun.loop_arguments()`, which only the trainer hands to `transformers.Trainer`.

The effective IPU config is built in the original's order: the file, then `--n_ipu` (replication
factors = n_ipu // ipus_per_replica), then `--ipu_config_overrides` followed by the flags forwarded into
the IPU config (`--gradient_accumulation_steps`, `--gradient_checkpointing`, `--auto_loss_scaling`), so an
explicit `replication_factor=` override wins over `--n_ipu` and a forwarded flag wins over an override of
the same field; last, `seed = --seed`.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from ..config.ipu_config import IPUConfig
from .device_model import DeviceModel, device_model_named
from .fsdp import check_fsdp_processes, fsdp_description, fsdp_plugin_arguments
from .pipeline_layout import PipelineLayout, refuse_with_pipeline, resolve_pipeline
from .placement import Placement
from .precision import Precision, resolve_precision

if TYPE_CHECKING:
    from .training_args import IPUTrainingArguments

logger = logging.getLogger(__name__)

# Workers started for --dataloader_mode async / async_rebatched when --dataloader_num_workers is not given.
ASYNC_DATALOADER_WORKERS = 4


def num_hidden_layers_of(config: Any) -> Optional[int]:
    """The number of transformer layers of a model config, whatever the architecture calls it."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def check_layers_fit(ipu_config: IPUConfig, model_config: Any) -> None:
    """The original's check that layers_per_ipu (and its inference twin) places exactly the model's layers."""
    num_layers = num_hidden_layers_of(model_config)
    if num_layers is None:
        logger.warning("Could not find the model's layer count; layers_per_ipu is not checked against it.")
        return
    ipu_config.resolved_layers_per_ipu(num_layers, for_inference=False)
    ipu_config.resolved_layers_per_ipu(num_layers, for_inference=True)


def forwarded_ipu_settings(args: IPUTrainingArguments) -> dict[str, Any]:
    """The command-line flags that are IPU config settings, as field values of the effective config."""
    forwarded: dict[str, Any] = {}
    if args.gradient_accumulation_steps is not None:
        forwarded["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    if getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing:
        forwarded["recompute_checkpoint_every_layer"] = True
    if args.auto_loss_scaling:
        forwarded["auto_loss_scaling"] = True
    return forwarded


def effective_ipu_config(ipu_config: IPUConfig, args: IPUTrainingArguments) -> IPUConfig:
    """A copy of the file's `ipu_config` with the command line applied in the original's order (module docstring)."""
    effective = copy.deepcopy(ipu_config)
    if args.n_ipu is not None:
        effective.apply_n_ipu(args.n_ipu)
    overrides = (args.ipu_config_overrides or "").strip().strip(",")
    if overrides:
        try:
            effective.update_from_string(overrides)
        except ValueError as error:
            raise ValueError(f"--ipu_config_overrides {args.ipu_config_overrides!r}: {error}") from None
    forwarded = forwarded_ipu_settings(args)
    for name, value in forwarded.items():
        setattr(effective, name, value)  # each field's validator runs on assignment
    effective.seed = args.seed
    try:
        effective.validate()
    except ValueError as error:
        if not overrides:
            raise
        raise ValueError(f"--ipu_config_overrides {args.ipu_config_overrides!r}: {error}") from None
    applied = [f"--n_ipu {args.n_ipu}"] if args.n_ipu is not None else []
    applied += [overrides] if overrides else []
    applied += [f"{name}={value}" for name, value in forwarded.items()]
    if applied:
        logger.info("IPU config from the command line: %s", ", ".join(applied))
    return effective


def refuse_data_parallel(args: IPUTrainingArguments) -> None:
    """One process driving several GPUs would make transformers wrap the model in `nn.DataParallel`, whose loss
    is a vector per GPU and whose batch split ignores the IPU config's placement: refused, with the command
    that starts one process per GPU instead."""
    if args.n_gpu > 1:
        script = os.path.basename(sys.argv[0]) or "run_pretraining.py"
        raise ValueError(
            f"this machine shows {args.n_gpu} GPUs to one process, which would train with torch.nn.DataParallel "
            f"(not supported): start one process per GPU with torchrun --nproc_per_node {args.n_gpu} {script} "
            f"<same flags>, or pick one GPU with CUDA_VISIBLE_DEVICES=0"
        )


def cpus_available() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def dataloader_workers(requested: int, mode: str) -> tuple[int, Optional[str]]:
    """Worker processes per training process, and a note for the log when the request was capped.

    `--dataloader_num_workers` counts per process, and the recipes ask for 64 or 128, written for one host
    process per IPU-POD: under `torchrun --nproc_per_node 8` that would start 512 workers. Each worker
    collates whole step batches (the upstream loop takes one batch per step) and keeps `prefetch_factor`
    of them in flight, so workers beyond the CPUs each process can use add only memory: the count is
    capped at the CPUs per local process.
    """
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    per_process = max(1, cpus_available() // local_processes)
    workers = requested
    if mode != "sync" and requested == 0:
        workers = max(1, min(ASYNC_DATALOADER_WORKERS, per_process - 1))
    if workers <= per_process:
        return workers, None
    note = (f"--dataloader_num_workers {requested} is per process: {local_processes} process(es) share "
            f"{cpus_available()} CPUs here, so each starts {per_process} worker(s)")
    return per_process, note


@dataclass(frozen=True)
class ResolvedRun:
    """A run's resolved settings; `args` are the user's arguments, unchanged."""

    args: IPUTrainingArguments
    ipu_config: IPUConfig
    train_placement: Placement
    eval_placement: Placement
    precision: Precision
    dataloader_num_workers: int
    dataloader_workers_note: Optional[str] = None
    device_model: Optional[DeviceModel] = None  # --device_model: a CPU run deciding as that GPU
    pipeline: Optional[PipelineLayout] = None  # --pipeline: the stages' processes

    @property
    def decides_as_gpu(self) -> bool:
        """Whether the run's GPU-dependent choices are a GPU's: on a CUDA device, or on the CPU with a device model."""
        return self.args.device.type == "cuda" or self.device_model is not None

    @property
    def uses_fsdp(self) -> bool:
        """--fsdp: parameters, gradients and optimizer state sharded by FSDP2 (run/fsdp.py)."""
        return bool(self.args.fsdp)

    @property
    def shards_optimizer_state(self) -> bool:
        """replicated_tensor_sharding with several processes: ZeRO stage 1 over the processes. Under --fsdp the
        optimizer state is sharded by FSDP itself (replicated_tensor_sharding is implied), so no ZeRO on top; under
        --pipeline each stage's optimizer holds only its stage's state."""
        return (bool(self.ipu_config.replicated_tensor_sharding) and self.args.world_size > 1 and not self.uses_fsdp
                and self.pipeline is None)

    @property
    def wants_offload(self) -> bool:
        """optimizer_state_offchip on a GPU (or modelling one): the optimizer state and update belong in host memory.
        A CPU's memory is the host's: there it has no effect."""
        return bool(self.ipu_config.optimizer_state_offchip) and self.decides_as_gpu

    @property
    def offloads_optimizer_state(self) -> bool:
        """`wants_offload`, by the package's HostOffloadedOptimizer; under --fsdp by FSDP2's CPUOffloadPolicy instead
        (`fsdp_offloads`)."""
        return self.wants_offload and not self.uses_fsdp

    @property
    def fsdp_offloads(self) -> bool:
        """Under --fsdp: optimizer_state_offchip on a GPU (or modelling one), or `--fsdp offload` / fsdp_config
        cpu_offload, puts the shards and the optimizer step in host memory (FSDP2's CPUOffloadPolicy)."""
        if not self.uses_fsdp:
            return False
        asked = bool((self.args.fsdp_plugin_args or {}).get("cpu_offload"))
        return asked or self.wants_offload

    @property
    def train_drop_last(self) -> bool:
        """Whether training drops its last incomplete batch: --dataloader_drop_last, by default yes (the
        original's `poptorch.DataLoader` did)."""
        return True if self.args.dataloader_drop_last is None else self.args.dataloader_drop_last

    @property
    def eval_drop_last(self) -> bool:
        """Whether evaluation drops its last incomplete batch: --dataloader_drop_last, by default no."""
        return bool(self.args.dataloader_drop_last)

    def loop_arguments(
        self, find_unused_parameters: Optional[bool] = None, fsdp_layer_classes: Optional[list[str]] = None
    ) -> IPUTrainingArguments:
        """A copy of the user's arguments as the upstream training loop must see them.

        One dataloader batch per step (the process's share of micro x replicas x accumulation x device
        iterations) and no accumulation of its own: the IPU config's accumulation and device iterations
        happen inside `IPUTrainer.training_step`. Recomputation is applied to the model from the IPU config,
        and the precision is the one resolved here (which also keeps an `ACCELERATE_MIXED_PRECISION` from
        the environment from adding a second autocast). `find_unused_parameters` fills in
        `--ddp_find_unused_parameters` when the user left it unset; under --fsdp, `fsdp_layer_classes` are the
        model's layer classes to shard one by one (`fsdp.layers_to_wrap`).
        """
        loop = copy.copy(self.args)
        loop.accelerator_config = copy.copy(self.args.accelerator_config)
        loop.gradient_accumulation_steps = 1
        loop.per_device_train_batch_size = self.train_placement.process_batch_size
        loop.per_device_eval_batch_size = self.eval_placement.process_batch_size
        loop.gradient_checkpointing = False
        if hasattr(loop, "activation_checkpointing"):
            loop.activation_checkpointing = False
        loop.fp16 = self.precision.mixed_precision == "fp16"
        loop.bf16 = self.precision.mixed_precision == "bf16"
        loop.mixed_precision = self.precision.mixed_precision
        loop.dataloader_num_workers = self.dataloader_num_workers
        # No clipping unless asked for (the original never clipped); upstream reads 0 as "off".
        loop.max_grad_norm = self.args.max_grad_norm or 0.0
        # The training dataloader's setting; IPUTrainer applies `eval_drop_last` to the evaluation ones.
        loop.dataloader_drop_last = self.train_drop_last
        # Old checkpoints are rotated by IPUTrainer once the new one is complete, never before (checkpoints.py).
        loop.save_total_limit = None
        gpu_pins = loop.dataloader_pin_memory and self.decides_as_gpu
        if loop.device.type == "cpu":
            loop.dataloader_pin_memory = False  # pinning needs an accelerator (a modelled GPU too); spare the warning
        if gpu_pins and hasattr(loop.accelerator_config, "non_blocking"):
            # Copies from pinned batches overlap the step before. A modelled GPU takes the same non-blocking path
            # (from unpinned CPU batches to the CPU: a plain copy).
            loop.accelerator_config.non_blocking = True
        if loop.ddp_find_unused_parameters is None and find_unused_parameters is not None:
            loop.ddp_find_unused_parameters = find_unused_parameters
        if self.uses_fsdp:
            loop.fsdp_plugin_args = fsdp_plugin_arguments(
                self.args.fsdp_plugin_args, self.precision.compute_dtype, self.fsdp_offloads, fsdp_layer_classes,
                pin_memory=self.args.device.type == "cuda")
        return loop

    def describe(self) -> list[str]:
        """The start-up block's lines about batches, precision, optimizer state and data loading."""
        eval_placement = self.eval_placement
        lines = list(self.train_placement.describe())
        if self.pipeline is not None:
            lines += self.pipeline.describe(self.train_placement.micro_batches_per_update)
        lines.append(
            f"evaluation batch: {eval_placement.samples_per_step} samples (micro {eval_placement.micro_batch_size} "
            f"x inference replicas {self.ipu_config.inference_replication_factor} x inference device iterations "
            f"{eval_placement.device_iterations})"
        )
        lines.append(f"precision: {self.precision.describe()}")
        sharded = f"sharded over {self.args.world_size} processes (ZeRO stage 1)"
        state = sharded if self.shards_optimizer_state else "one full copy per process"
        memory = "host" if self.offloads_optimizer_state else self.args.device.type.upper()
        if self.device_model is not None and not self.offloads_optimizer_state:
            memory = "the modelled GPU's (here CPU)"
        if self.uses_fsdp:
            reshard = (self.args.fsdp_plugin_args or {}).get("reshard_after_forward", True)
            lines.append(f"model: {fsdp_description(bool(reshard), self.fsdp_offloads, self.args.world_size)}")
        else:
            lines.append(f"optimizer state: {state}, in {memory} memory")
        if self.device_model is not None:
            lines.append("pinned host memory: none (pinning needs a CUDA driver); the GPU's non-blocking copies run as "
                         "plain CPU copies")
        if self.dataloader_num_workers:
            lines.append(f"dataloader: {self.args.dataloader_mode}, {self.dataloader_num_workers} worker process(es) "
                         "per training process")
        if self.dataloader_workers_note:
            lines.append(self.dataloader_workers_note)
        if self.args.pad_on_batch_axis:
            lines.append("batches padded on the batch axis to the full step size")
        return lines

    def ipu_only_settings(self) -> dict[str, Any]:
        """The IPU config's settings that have no effect on this machine (the ones used here left out)."""
        settings = self.ipu_config.ipu_only_settings()
        if self.shards_optimizer_state:
            settings.pop("replicated_tensor_sharding", None)
        if self.offloads_optimizer_state or self.fsdp_offloads:
            settings.pop("optimizer_state_offchip", None)
        if self.uses_fsdp:
            settings.pop("replicated_tensor_sharding", None)  # implied: FSDP shards the optimizer state
        if self.pipeline is not None:  # they place the stages
            for name in ("layers_per_ipu", "ipus_per_replica", "inference_layers_per_ipu", "inference_ipus_per_replica"):
                settings.pop(name, None)
        return settings


def resolve_run(ipu_config: IPUConfig, args: IPUTrainingArguments, model_config: Any = None) -> ResolvedRun:
    """Resolve the run from the file's `ipu_config`, the user's `args` and (when known) the model's config.

    Raises ValueError / IncompatibleIPUConfigError (one line each) for a layer placement that does not fit
    the model, processes that cannot share an update, several GPUs in one process, or a precision the
    device cannot run; none of it needs weights or data.
    """
    refuse_data_parallel(args)
    if args.fsdp:
        check_fsdp_processes(args.world_size)
    effective = effective_ipu_config(ipu_config, args)
    if model_config is not None:
        check_layers_fit(effective, model_config)
    pipeline = resolve_pipeline(args, effective, model_config, num_hidden_layers_of(model_config))
    stages = pipeline.stages if pipeline is not None else 1
    train_placement = Placement.for_training(effective, args.per_device_train_batch_size, args.world_size // stages,
                                             pipeline_stages=stages)
    eval_placement = Placement.for_inference(effective, args.per_device_eval_batch_size, args.world_size)
    device_model = device_model_named(getattr(args, "device_model", None))
    precision = resolve_precision(
        args.device, args.fp32, args.fp16, args.bf16, args.loss_scaling, effective.auto_loss_scaling, device_model
    )
    workers, note = dataloader_workers(args.dataloader_num_workers, args.dataloader_mode)
    run = ResolvedRun(
        args=args,
        ipu_config=effective,
        train_placement=train_placement,
        eval_placement=eval_placement,
        precision=precision,
        dataloader_num_workers=workers,
        dataloader_workers_note=note,
        device_model=device_model,
        pipeline=pipeline,
    )
    if run.pipeline is not None and run.wants_offload:
        raise refuse_with_pipeline("optimizer_state_offchip=true", "set optimizer_state_offchip=false")
    return run
