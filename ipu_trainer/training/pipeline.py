"""`--pipeline`: a replica's layers over `ipus_per_replica` processes, through `torch.distributed.pipelining`.

The processes form a `DeviceMesh` of (data parallel, pipeline) = (W / P, P) (`run.pipeline_layout` says which process
runs which stage). Each process keeps the whole model object, so that every parameter keeps its name and a save is
the plain transformers checkpoint; it trains only its stage's part (`models.stages`), which is what its optimizer
holds. The machinery is upstream's:

- `PipelineStage` and a schedule (`Schedule1F1B` by default, `ScheduleGPipe`) run one weight update's micro-batches
  through the stages, each micro-batch's loss a mean over its own tokens, the gradients their mean (`scale_grads`);
- the stage module is in `DistributedDataParallel` over its data-parallel group (the same stage of every pipeline),
  which the schedule lets all-reduce once per update, on the last micro-batch's backward.

What is added here, each a few collectives per update:

- the batch: each process reads 1/P of its pipeline's batch; the pipeline's processes gather the parts (in stage
  order, so the pipeline holds the batch one unpipelined data-parallel process would);
- the tied embedding / output-projection weight (BERT's decoder, GPT-2's LM head) is on the first stage and on the
  last: its two gradients are summed between the two, so both copies take the same update and stay equal;
- the loss is broadcast from the last stage; gradient-norm clipping uses the norm over all stages (the tied weight
  counted once); a float16 overflow on any process makes every process skip the update (the GradScalers agree);
- before a save or an evaluation the stages' current weights are broadcast to every process (`sync_weights`), so
  process 0 writes the whole model and evaluation can use another split (`inference_layers_per_ipu`);
- evaluation runs forward only through the evaluation stages, one micro-batch per process's batch, and hands each
  process the outputs of its own batch (what the upstream evaluation loop expects of it).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.nn.parallel import DistributedDataParallel

from ..models.stages import split_into_stages
from ..run.pipeline_layout import PipelineLayout

logger = logging.getLogger(__name__)

SCHEDULE_CLASSES = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe}
LAYOUT_FILE = "pipeline.json"  # in a pipelined checkpoint: the layout its optimizer parts belong to
# Labels are padded with this when the processes of a pipeline hold batches of different sequence lengths.
_LABEL_PAD = -100


def optimizer_part_name(stage: int) -> str:
    """The optimizer state file of a stage in a pipelined checkpoint: stage 0's is upstream's `optimizer.pt`."""
    return "optimizer.pt" if stage == 0 else f"optimizer_stage{stage}.pt"


def _pad_to(tensor: torch.Tensor, shape: tuple[int, ...], value: int) -> torch.Tensor:
    if tuple(tensor.shape[1:]) == shape:
        return tensor
    padding = []
    for have, want in reversed(list(zip(tensor.shape[1:], shape))):
        padding += [0, want - have]
    return nn.functional.pad(tensor, padding, value=value)


def concatenate_batches(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The parts' tensors concatenated along the batch axis, right-padded to a common shape where a collator padded
    each part to its own longest sequence (labels with -100, everything else with 0: masked out either way)."""
    batch = {}
    for key in parts[0]:
        values = [part[key] for part in parts]
        if not all(isinstance(value, torch.Tensor) and value.dim() > 0 for value in values):
            batch[key] = values[0]
            continue
        shape = tuple(max(sizes) for sizes in zip(*(value.shape[1:] for value in values)))
        pad = _LABEL_PAD if "label" in key and not values[0].is_floating_point() else 0
        batch[key] = torch.cat([_pad_to(value, shape, pad) for value in values])
    return batch


class _AutocastStage(nn.Module):
    """A stage module run under the trainer's autocast (accelerate applies it by wrapping the model it prepares; the
    stages are not prepared by it), keeping the stage's parameter names."""

    def __init__(self, stage: nn.Module, autocast: Callable[[], ContextManager]) -> None:
        super().__init__()
        self.stage = stage
        self._autocast = autocast

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._autocast():
            return self.stage(*args, **kwargs)


class _RecordOutputs(nn.Module):
    """The last evaluation stage: keeps each micro-batch's model output and gives the schedule a placeholder."""

    def __init__(self, stage: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.stage, self.device = stage, device
        self.outputs: list[Any] = []

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        output = self.stage(*args, **kwargs)
        self.outputs.append(output)
        rows = (args[0] if args else next(iter(kwargs.values()))).shape[0]
        return torch.zeros(rows, device=self.device)


class _Group:
    """One split of the model over the processes: this process's stage module and its pipeline group."""

    def __init__(self, model: nn.Module, layers: tuple[int, ...], stages: int, mesh_names: tuple[str, str],
                 device: torch.device) -> None:
        world = dist.get_world_size()
        self.stages = stages
        self.mesh = init_device_mesh(device.type, (world // stages, stages), mesh_dim_names=mesh_names)
        self.pipeline_group = self.mesh.get_group(mesh_names[1])
        self.data_parallel_group = self.mesh.get_group(mesh_names[0])
        rank = dist.get_rank()
        self.index, self.replica = rank % stages, rank // stages
        self.all_modules = split_into_stages(model, list(layers))
        self.module = self.all_modules[self.index]
        # global ranks of this pipeline's stages, in stage order
        self.ranks = [self.replica * stages + stage for stage in range(stages)]

    def gather(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The pipeline's batch: every stage process's dataloader batch, in stage order."""
        local = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        parts: list[Any] = [None] * self.stages
        dist.all_gather_object(parts, local, group=self.pipeline_group)
        return concatenate_batches(parts)


class Pipeline:
    """The pipelined run of one process: built by `IPUTrainer` when `run.pipeline` is set (see the module docstring)."""

    def __init__(self, model: nn.Module, layout: PipelineLayout, micro_batches: int, device: torch.device,
                 autocast: Callable[[], ContextManager], scaler: Callable[[], Any]) -> None:
        if not dist.is_initialized() or dist.get_world_size() != layout.world_size:
            raise ValueError("--pipeline needs the processes torchrun starts (torchrun --nproc_per_node "
                             f"{layout.world_size} ...)")
        self.layout, self.micro_batches, self.device = layout, micro_batches, device
        self._autocast, self._scaler = autocast, scaler
        self.train_group = _Group(model, layout.layers_per_stage, layout.stages, ("dp", "pp"), device)
        group = self.train_group
        self.stage_index, self.stage_module = group.index, group.module
        self.is_first, self.is_last = group.index == 0, group.index == layout.stages - 1
        # The tied weight: a parameter of the first stage that the last stage also holds.
        first = {id(parameter) for parameter in group.all_modules[0].parameters()}
        self.tied = [parameter for parameter in group.all_modules[-1].parameters() if id(parameter) in first]
        tie_groups = [dist.new_group([replica * layout.stages, replica * layout.stages + layout.stages - 1])
                      for replica in range(layout.data_parallel)] if self.tied else []
        self._tie_group = tie_groups[group.replica] if tie_groups else None
        # Where each parameter's current value lives: the first stage holding it, in pipeline 0 (global rank = stage).
        self._owners: list[tuple[nn.Parameter, int]] = []
        seen: set[int] = set()
        for stage, module in enumerate(group.all_modules):
            for parameter in module.parameters():
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    self._owners.append((parameter, stage))
        unplaced = [name for name, parameter in model.named_parameters() if id(parameter) not in seen]
        if unplaced:
            logger.info("Not in any pipeline stage (unused by the model's loss, never updated): %s", ", ".join(unplaced))

        module: nn.Module = _AutocastStage(self.stage_module, autocast)
        if layout.data_parallel > 1:
            device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
                if device.type == "cuda" else None
            module = DistributedDataParallel(module, process_group=group.data_parallel_group, device_ids=device_ids)
        self.module = module  # what the training loop holds as its model
        self._recorded: list[torch.Tensor] = []
        self._train_schedule = None
        self._eval: Optional[_Group] = None
        self._eval_runs: dict[Any, tuple[Any, _RecordOutputs]] = {}
        if layout.eval_stages > 1:
            same = (layout.eval_stages, layout.eval_layers_per_stage) == (layout.stages, layout.layers_per_stage)
            self._eval = group if same else _Group(model, layout.eval_layers_per_stage, layout.eval_stages,
                                                  ("eval_dp", "eval_pp"), device)
        self.model = model

    # ---- training ---------------------------------------------------------------------------------------------

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The schedule's loss function: the last stage's output is the micro-batch's loss already."""
        self._recorded.append(output.detach().float())
        scaler = self._scaler()
        return scaler.scale(output) if scaler is not None else output

    def _schedule(self):
        if self._train_schedule is None:
            stage = PipelineStage(self.module, self.stage_index, self.layout.stages, self.device,
                                  group=self.train_group.pipeline_group)
            self._train_schedule = SCHEDULE_CLASSES[self.layout.schedule](
                stage, n_microbatches=self.micro_batches, loss_fn=self._loss, scale_grads=True)
        return self._train_schedule

    def gather(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """This process's pipeline's step batch, from the parts its stage processes read."""
        gathered = self.train_group.gather(batch)
        return {key: value.to(self.device) if isinstance(value, torch.Tensor) else value
                for key, value in gathered.items()}

    def train_update(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward and backward of one weight update's micro-batches (`batch` holds them all, in order) through the
        pipeline; the gradients are then those of the unpipelined update. Returns the mean micro-batch loss (on the
        last stage; 0 elsewhere, see `broadcast_loss`)."""
        args, kwargs = self.stage_module.stage_inputs(batch)
        schedule = self._schedule()
        self._recorded.clear()
        scaler = self._scaler()
        if scaler is not None and not self.is_last:
            # The loss, which the scaler scales, is on the last stage; the gradients here carry its scale too, and the
            # scaler must know it has one before it unscales them (its scale is made on its first use).
            scaler.scale(torch.zeros((), device=self.device))
        if self.is_last:
            rows = batch["input_ids"].shape[0]
            schedule.step(*args, target=torch.zeros(rows, device=self.device), return_outputs=False, **kwargs)
        else:
            schedule.step(*args, return_outputs=False, **kwargs)
        self._sum_tied_gradients()
        if scaler is not None:
            self._agree_on_overflow()
        if not self._recorded:
            return torch.zeros((), device=self.device)
        # The last micro_batches calls: on its first step the schedule also calls the loss function on the placeholder
        # output of its shape inference. Any other count means torch changed how its schedules call the loss.
        _check_calls(len(self._recorded), self.micro_batches, "loss function")
        return torch.stack(self._recorded[-self.micro_batches:]).mean()

    def training_step(self, inputs: dict[str, Any], rows_per_update: int, apply_update: Callable[[], None]) -> torch.Tensor:
        """One trainer step: the pipeline's step batch gathered, then each of its weight updates through the pipeline,
        all but the last applied by `apply_update` (the loop applies the last). Returns the mean loss of the step's
        micro-batches, the same on every process of the pipeline."""
        self.model.train()
        batch = self.gather(inputs)
        rows = batch["input_ids"].shape[0]
        if rows % rows_per_update:
            raise ValueError(f"--pipeline: a step batch of {rows} samples is not a whole number of weight updates of "
                             f"{rows_per_update}; keep --dataloader_drop_last (the default)")
        updates = [{key: value[start : start + rows_per_update] if isinstance(value, torch.Tensor) else value
                    for key, value in batch.items()} for start in range(0, rows, rows_per_update)]
        total = torch.zeros((), device=self.device)
        for index, update in enumerate(updates):
            total += self.train_update(update)
            if index < len(updates) - 1:
                apply_update()
        return self.broadcast_loss(total / len(updates))

    def _sum_tied_gradients(self) -> None:
        if self._tie_group is None or not (self.is_first or self.is_last):
            return
        for parameter in self.tied:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad, group=self._tie_group)

    def _parameters(self) -> list[nn.Parameter]:
        return [parameter for parameter in self.stage_module.parameters() if parameter.requires_grad]

    def _agree_on_overflow(self) -> None:
        """Every process's GradScaler skips the update if any process's gradients overflowed: a process whose own
        gradients are finite gets one inf where its scaler looks, so that all scalers also halve the scale alike."""
        grads = [parameter.grad for parameter in self._parameters() if parameter.grad is not None]
        if not grads:
            local = torch.zeros(1, device=self.device)
        else:  # computed on the device: no wait for it here, the scaler's own check waits once
            local = torch.stack([~torch.isfinite(grad).all() for grad in grads]).any().float().reshape(1)
        overflow = local.clone()
        dist.all_reduce(overflow, op=dist.ReduceOp.MAX)
        if grads:
            first = grads[0].view(-1)[:1]
            first.copy_(torch.where(overflow > local, torch.full_like(first, float("inf")), first))

    def broadcast_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The last stage's loss on every process of its pipeline (the value the loop logs and averages)."""
        loss = loss.detach().float().reshape(()).clone()
        group = self.train_group
        dist.broadcast(loss, src=group.ranks[-1], group=group.pipeline_group)
        return loss

    def clip_grad_norm_(self, accelerator: Any, max_norm: float) -> torch.Tensor:
        """The gradient norm over every stage's parameters (the tied weight once), clipping them to `max_norm`
        where finite: what `clip_grad_norm_` gives on the unpipelined model. Unscales float16 gradients first."""
        accelerator.unscale_gradients()
        tied = {id(parameter) for parameter in self.tied}
        counted = [parameter.grad for parameter in self._parameters() if parameter.grad is not None
                   and not (id(parameter) in tied and not self.is_first)]
        local = torch.nn.utils.get_total_norm(counted, foreach=None) if counted else torch.zeros((), device=self.device)
        squared = (local.float() ** 2).reshape(1)
        dist.all_reduce(squared, group=self.train_group.pipeline_group)
        total = squared.sqrt()[0]
        if max_norm != float("inf"):
            torch.nn.utils.clip_grads_with_norm_(self._parameters(), max_norm, total)
        return total

    # ---- weights, checkpoints ---------------------------------------------------------------------------------

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Every parameter's current value (from its stage in pipeline 0) on every process."""
        for parameter, owner in self._owners:
            dist.broadcast(parameter.data, src=owner)

    def layout_record(self) -> dict[str, Any]:
        return {"stages": self.layout.stages, "layers_per_stage": list(self.layout.layers_per_stage),
                "world_size": self.layout.world_size,
                "optimizer_parts": [optimizer_part_name(stage) for stage in range(self.layout.stages)]}

    def save_layout(self, folder: str) -> None:
        with open(os.path.join(folder, LAYOUT_FILE), "w", encoding="utf-8") as handle:
            json.dump(self.layout_record(), handle, indent=1)

    def save_optimizer_part(self, optimizer: torch.optim.Optimizer, folder: str) -> None:
        """Stages after the first write their optimizer state (from pipeline 0); stage 0's is upstream's
        optimizer.pt, written by process 0."""
        if self.stage_index > 0 and self.train_group.replica == 0:
            os.makedirs(folder, exist_ok=True)  # process 0 may not have created it yet
            torch.save(optimizer.state_dict(), os.path.join(folder, optimizer_part_name(self.stage_index)))

    def optimizer_part(self, checkpoint: str) -> str:
        """This stage's optimizer state file in `checkpoint`, after checking that the checkpoint has this layout."""
        check_checkpoint_layout(checkpoint, self.layout_record())
        return os.path.join(checkpoint, optimizer_part_name(self.stage_index))

    # ---- evaluation -------------------------------------------------------------------------------------------

    def evaluation_module(self, model: nn.Module) -> nn.Module:
        """The module upstream's prediction step calls (`module(**inputs)`): the model's forward on this process's
        batch, run forward-only through the evaluation stages."""
        return _PipelinedForward(self, model)

    def evaluate_batch(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        group = self._eval
        if group is None:  # inference_ipus_per_replica 1: every process runs the whole (synced) model
            return model(**inputs)
        batch = group.gather(inputs)
        batch = {key: value.to(self.device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        key = tuple((name, tuple(value.shape)) for name, value in batch.items() if isinstance(value, torch.Tensor))
        if key not in self._eval_runs:
            module = _AutocastStage(group.module, self._autocast)
            recorder = _RecordOutputs(module, self.device) if group.index == group.stages - 1 else module
            stage = PipelineStage(recorder, group.index, group.stages, self.device, group=group.pipeline_group)
            self._eval_runs[key] = (ScheduleGPipe(stage, n_microbatches=group.stages), recorder)
        schedule, recorder = self._eval_runs[key]
        args, kwargs = group.module.stage_inputs(batch)
        schedule.step(*args, **kwargs)
        outputs = None
        if isinstance(recorder, _RecordOutputs):
            # The last `stages` calls (the first run of a schedule also calls the stage for its shape inference).
            _check_calls(len(recorder.outputs), group.stages, "last evaluation stage")
            outputs = [type(output)({name: value.cpu() for name, value in output.items() if value is not None})
                       for output in recorder.outputs[-group.stages:]]
            recorder.outputs.clear()
        mine: list[Any] = [None]
        dist.scatter_object_list(mine, outputs, src=group.ranks[-1], group=group.pipeline_group)
        output = mine[0]
        for name, value in list(output.items()):
            output[name] = value.to(self.device)
        return output


def _check_calls(calls: int, expected: int, what: str) -> None:
    """torch's pipeline schedules call the last stage (and the loss) once per micro-batch, plus once for shape
    inference on their first run; the results are read from the last calls. Anything else would silently mix in
    a placeholder's output, so it stops the run instead."""
    if calls not in (expected, expected + 1):
        raise RuntimeError(f"--pipeline: torch's schedule called the {what} {calls} times for {expected} micro-batches; "
                           "this torch version pipelines differently from the one the package was tested with")


class _PipelinedForward(nn.Module):
    def __init__(self, pipeline: Pipeline, model: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "pipeline", pipeline)
        object.__setattr__(self, "model", model)

    def forward(self, **inputs: Any) -> Any:
        return self.pipeline.evaluate_batch(self.model, inputs)


def check_checkpoint_layout(checkpoint: str, layout: Optional[dict[str, Any]]) -> None:
    """A checkpoint's optimizer state resumes only on the layout that wrote it (`layout` None: unpipelined)."""
    path = os.path.join(checkpoint, LAYOUT_FILE)
    saved = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
    if saved is None and layout is None:
        return
    if saved is None:
        raise ValueError(f"{checkpoint} was written without --pipeline: its optimizer state resumes only without it "
                         "(or start afresh with --overwrite_output_dir)")
    if layout is None:
        raise ValueError(f"{checkpoint} was written with --pipeline ({saved['stages']} stages): resume it with --pipeline "
                         "and the same layers_per_ipu (or start afresh with --overwrite_output_dir)")
    fields = ("stages", "layers_per_stage")  # the data-parallel pipelines hold the same state: any number resumes
    if any(saved.get(name) != layout.get(name) for name in fields):
        was = ", ".join(f"{name}={saved.get(name)}" for name in fields)
        now = ", ".join(f"{name}={layout.get(name)}" for name in fields)
        raise ValueError(f"{checkpoint} was written by a pipeline of another layout ({was}; this run: {now}): resume "
                         "it on the same layout (or start afresh with --overwrite_output_dir)")

