"""`IPUTrainer`: `transformers.Trainer` that keeps the batch math of an IPU config on CPUs and GPUs.

One trainer step takes one dataloader batch of `micro x replicas x accumulation x device_iterations`
samples (per process: its share) and performs `device_iterations` weight updates, each averaging the
gradients of `replicas x accumulation` micro-batches. The upstream loop is left as it is: it sees one
batch per step and no accumulation of its own (the numbers of `ResolvedRun.loop_arguments()`), performs
the last update of each step, and advances the learning-rate schedule once per step. The updates before
the last one happen inside `training_step`, through the same accelerate clip-and-step the loop uses.

Everything the run's numbers depend on is resolved once, in `resolved_run`; this class only wires hooks.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import logging
import os
import shutil
import signal
import time
import warnings
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch
from accelerate.utils import send_to_device
from accelerate.utils.memory import clear_device_cache
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerState, set_seed
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import reissue_pt_warnings
from transformers.trainer_utils import TrainOutput
from transformers.utils import logging as hf_logging
from transformers.utils import check_torch_load_is_safe

from ..config.ipu_config import IPUConfig
from ..data.collators import pad_on_batch_axis
from ..models.layers import num_projection_chunks, set_recomputation
from ..run.fsdp import layers_to_wrap, output_embedding_group, shard_cpu_processes, shard_with_embedding_group
from ..run.placement import Placement
from ..run.precision import Precision
from ..run.resolved_run import ResolvedRun, resolve_run
from ..run.training_args import IPUTrainingArguments
from .checkpoints import (
    FSDP_OPTIMIZER_NAME,
    OPTIMIZER_NAME,
    SCHEDULER_NAME,
    TRAINER_STATE_NAME,
    checkpoint_problem,
    folder_bytes,
    last_resumable_checkpoint,
    mark_complete,
    rotate_checkpoints,
)
from .loss_scaling import StaticLossScaleGuard
from .optimizer_state import (
    HostOffloadedOptimizer,
    ShardedOptimizer,
    find_wrapped_optimizer,
    holds_no_tensor_state,
    load_hyperparameters,
    prepare_optimizer_for_checkpoint,
)
from .optimizers import POPTORCH_MAX_WEIGHT_NORM, AdamW, Lamb, original_parameter_groups
from .pipeline import Pipeline, check_checkpoint_layout
from .run_control import (
    CheckpointWriteError,
    ShutdownTimeoutCheck,
    StepTimer,
    StopOnSignal,
    StopOnSignalCallback,
    TrainingInterrupted,
    decided_by_process_zero,
    one_line,
    torchrun_shutdown_timeout,
)
from .throughput import ThroughputMeter

logger = logging.getLogger(__name__)

# (optimizer, num_warmup_steps=..., num_training_steps=...) -> scheduler, e.g. `get_groupbert_schedule`.
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def split_batch(batch: dict[str, Any], micro_batch_size: int) -> list[dict[str, Any]]:
    """Cut a batch of tensors into consecutive micro-batches along the first axis."""
    sizes = {len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors disagree on the batch size: {sorted(sizes)}")
    total = sizes.pop()
    return [
        {k: (v[start : start + micro_batch_size] if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
         for k, v in batch.items()}
        for start in range(0, total, micro_batch_size)
    ]


def _original_keywords(
    processing_class: Any, tokenizer: Any, optimizers: tuple, scheduler_factory: Optional[SchedulerFactory],
    model_init: Optional[Callable],
) -> tuple[Any, tuple, Optional[functools.partial]]:
    """The keywords of optimum-graphcore's IPUTrainer in upstream's terms: `tokenizer` is the processing class,
    and a `functools.partial` in the scheduler slot of `optimizers` is kept aside to be called with the
    trainer's optimizer (upstream would keep it as the scheduler object and fail at the first step)."""
    if tokenizer is not None:
        if processing_class is not None and processing_class is not tokenizer:
            raise TypeError("IPUTrainer got both tokenizer= and processing_class=; pass one (they are the same thing)")
        processing_class = tokenizer
    optimizer, scheduler = optimizers
    partial = None
    if isinstance(scheduler, functools.partial):
        partial, optimizers = scheduler, (optimizer, None)
    if partial is not None and scheduler_factory is not None:
        raise TypeError("IPUTrainer got a scheduler both in optimizers=(..., partial) and as scheduler_factory; pass one")
    if model_init is not None and (optimizer is not None or scheduler is not None):
        raise RuntimeError(
            "Passing a `model_init` is incompatible with providing the `optimizers` argument: each train() builds a "
            "new model, which the given optimizer does not hold"
        )
    return processing_class, optimizers, partial


def tensorboard_line(args: Any) -> Optional[str]:
    """With --report_to tensorboard, where its event files go and the command to view them; else None.
    transformers' callback writes to $TENSORBOARD_LOGGING_DIR (--logging_dir sets it), else to a new
    `runs/<date>_<host>` folder under --output_dir for each run, named only when training starts."""
    if "tensorboard" not in (args.report_to or []):
        return None
    folder = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if folder:
        folder = shown = os.path.expanduser(folder)
    else:
        folder = os.path.join(args.output_dir, "runs")
        shown = os.path.join(folder, "<date>_<host>")
    return f"tensorboard: events in {shown}; view with: tensorboard --logdir {folder}"


def _call_scheduler_partial(
    partial: functools.partial, optimizer: torch.optim.Optimizer, num_warmup_steps: int, num_training_steps: int
) -> Any:
    """Build the scheduler from `optimizers=(None, functools.partial(schedule, ...))` as optimum-graphcore did,
    `partial(optimizer)`, also passing the run's `num_warmup_steps` / `num_training_steps` where the schedule
    requires them and the partial has not bound them (the call would fail without them)."""
    parameters = inspect.signature(partial).parameters
    run_values = {"num_warmup_steps": num_warmup_steps, "num_training_steps": num_training_steps}
    missing = {
        name: value for name, value in run_values.items()
        if name in parameters and parameters[name].default is inspect.Parameter.empty
    }
    return partial(optimizer, **missing)


@contextlib.contextmanager
def _silence_completion_after_a_signal(stop: StopOnSignal) -> Iterator[None]:
    """Upstream's loop ends with "Training completed" also when a signal stopped it; that line is dropped once a
    signal was received, since the run is not complete. A filter on the one upstream logger that writes it."""

    def keep(record: logging.LogRecord) -> bool:
        return stop.signal_number is None or "Training completed" not in record.getMessage()

    upstream = logging.getLogger("transformers.trainer")
    upstream.addFilter(keep)
    try:
        yield
    finally:
        upstream.removeFilter(keep)


# ---- save log lines: one per save ------------------------------------------------------------------
# Upstream logs every file a save writes (the folder, config.json (twice: see models.parallelize),
# generation_config.json, the weights, the tokenizer files) and draws a progress bar for one weights shard: 6-7
# lines per checkpoint. This is the one place they are held back: during a save, transformers' info lines and
# progress bars are off unless --log_level debug (or a transformers logger set to debug) asks for every line,
# and the trainer states each save in one line once it is complete.


@contextlib.contextmanager
def upstream_save_quiet() -> Iterator[None]:
    """transformers' info lines and progress bars off for the duration, unless its logging is at debug level."""
    upstream = logging.getLogger("transformers")
    if upstream.getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    level, progress_bars = upstream.level, hf_logging.is_progress_bar_enabled()
    upstream.setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        upstream.setLevel(level)
        if progress_bars:
            hf_logging.enable_progress_bar()


def readable_size(num_bytes: float) -> str:
    """A size for a log line: 812 kB, 3.4 MB, 1.2 GB."""
    for unit in ("bytes", "kB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            break
        num_bytes /= 1000
    return f"{num_bytes:.0f} {unit}" if unit in ("bytes", "kB") or num_bytes >= 100 else f"{num_bytes:.1f} {unit}"


class IPUTrainer(Trainer):
    """Trainer for IPU-config driven runs. Takes the same arguments as `transformers.Trainer` plus:

    Args:
        ipu_config: the IPU config as loaded from its file; the trainer resolves the run from it and `args`.
        run: a run already resolved by `resolve_run` (the scripts do this before loading any weights);
            given instead of `ipu_config`.
        scheduler_factory: optional `(optimizer, num_warmup_steps=..., num_training_steps=...) -> scheduler`,
            used instead of `--lr_scheduler_type` (e.g. `get_groupbert_schedule`).

    and the keywords of optimum-graphcore's `IPUTrainer`: `tokenizer` (the `processing_class`, also readable as
    `trainer.tokenizer`), `eval_data_collator` (the collator of evaluation and prediction, default
    `data_collator`), `model_init`, `optimizers=(None, functools.partial(schedule, ...))` (the partial is
    called with the trainer's optimizer when the schedule is built, and given `num_warmup_steps` /
    `num_training_steps` from the run if it needs them and has not bound them) and `force_to_pipelined`
    (accepted; every model runs here as it is, so there is nothing to force).

    `self.args` are the arguments the upstream loop runs with (see `ResolvedRun.loop_arguments`); the
    user's own arguments are `self.run.args`, and those are what `training_args.bin` records.
    """

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        ipu_config: Optional[IPUConfig] = None,
        args: Optional[IPUTrainingArguments] = None,
        data_collator: Optional[Callable] = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics: Optional[Callable] = None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics: Optional[Callable] = None,
        scheduler_factory: Optional[SchedulerFactory] = None,
        run: Optional[ResolvedRun] = None,
        eval_data_collator: Optional[Callable] = None,
        tokenizer=None,
        model_init: Optional[Callable[..., nn.Module]] = None,
        force_to_pipelined: bool = False,
        **kwargs,
    ):
        processing_class, optimizers, scheduler_partial = _original_keywords(
            processing_class, tokenizer, optimizers, scheduler_factory, model_init
        )
        if args is None and run is None:
            logger.info("No IPUTrainingArguments given: using output_dir=tmp_trainer")
            args = IPUTrainingArguments(output_dir="tmp_trainer")
        if model is None:
            if model_init is None:
                raise RuntimeError("IPUTrainer requires either a `model` or `model_init` argument")
            set_seed((run.args if run is not None else args).seed)  # the model is built before upstream seeds
            self.model_init = model_init
            model = Trainer.call_model_init(self)
        elif model_init is not None:
            raise ValueError("IPUTrainer takes either a `model` or a `model_init` argument, not both")
        if run is None:
            if not isinstance(args, IPUTrainingArguments):
                raise TypeError("IPUTrainer needs IPUTrainingArguments (the IPU config owns accumulation and precision)")
            if ipu_config is None:
                raise TypeError("IPUTrainer needs an ipu_config (or a run resolved by resolve_run)")
            if args.pod_type is not None:
                ipu_config = ipu_config.for_pod_type(args.pod_type)  # per-POD-type values, as the 0.5 releases did
            run = resolve_run(ipu_config, args, getattr(model, "config", None))
        elif ipu_config is not None and ipu_config is not run.ipu_config:
            raise TypeError("pass either ipu_config or run (whose ipu_config is the effective one), not both")
        elif args is not None and args is not run.args:
            raise TypeError("args are not the run's: pass the arguments the run was resolved from (run.args), or no args")
        self.run = run
        self.ipu_config = run.ipu_config
        self.scheduler_factory = scheduler_factory
        self._scheduler_partial = scheduler_partial
        self._scheduler_from_factory = False
        self._eval_data_collator = eval_data_collator
        self.force_to_pipelined = force_to_pipelined
        self.pipeline: Optional[Pipeline] = None  # --pipeline: built once the accelerator exists (below)

        self._prepare_model(model)
        # Whether this trainer builds the original's optimizer with its parameter groups (`create_optimizer`).
        self._builds_original_optimizer = False
        if kwargs.get("optimizer_cls_and_kwargs") is None and optimizers[0] is None:
            kwargs["optimizer_cls_and_kwargs"] = self._optimizer_cls_and_kwargs(run.args, model)
            self._builds_original_optimizer = run.args.uses_original_optimizer
        if self.ipu_config.executable_cache_dir and (run.args.torch_compile or run.args.compile_only):
            # Inductor reads its cache location from the environment each time it compiles (and fills in its
            # default there once asked), so the IPU config's executable_cache_dir is put there explicitly.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(self.ipu_config.executable_cache_dir)

        # The package's own models (the ones with parallelize()) use every parameter in every step, so DDP can
        # skip its search for unused ones; for other models upstream's default stands.
        find_unused = False if hasattr(model, "parallelize") else None
        super().__init__(
            model=model,
            args=run.loop_arguments(find_unused_parameters=find_unused,
                                    fsdp_layer_classes=layers_to_wrap(model) if run.uses_fsdp else None),
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            **kwargs,
        )
        # Set after upstream's own set-up, which would build the model a second time from it.
        self.model_init = model_init
        # Each micro-batch loss is a mean over its own tokens and the update averages micro-batches, as on
        # the IPU; the upstream token-count normalisation across accumulation would change that.
        self.model_accepts_loss_kwargs = False
        self._checkpoint_in_progress: Optional[str] = None
        self._stop_on_signal = StopOnSignalCallback(self.args.device)
        self._shutdown_check = ShutdownTimeoutCheck(torchrun_shutdown_timeout())
        self.add_callback(_CheckpointCompletion(self))
        self.add_callback(self._shutdown_check)  # after _CheckpointCompletion: the save ends with its marker
        self.add_callback(self._stop_on_signal)
        self._step_timer = StepTimer()
        self.add_callback(self._step_timer)
        self.throughput = ThroughputMeter.for_model(self.model, self.args.device, run.precision.compute_dtype,
                                                    run.device_model)
        self.add_callback(self.throughput)
        self.static_loss_scale_guard: Optional[StaticLossScaleGuard] = None
        if run.precision.mixed_precision == "fp16" and not run.precision.dynamic_loss_scale:
            self.static_loss_scale_guard = StaticLossScaleGuard(
                run.precision.loss_scale, lambda: self.accelerator.optimizer_step_was_skipped)
            self.add_callback(self.static_loss_scale_guard)
        if run.pipeline is not None:
            self.pipeline = Pipeline(self.model, run.pipeline, self.train_placement.micro_batches_per_update,
                                     self.args.device, self.accelerator.autocast, lambda: self.accelerator.scaler)
        self._log_run_layout()

    def _prepare_model(self, model: nn.Module) -> None:
        """The IPU config's speed settings on the model: `parallelize` for the package's own models,
        recomputation for any other."""
        if hasattr(model, "parallelize"):
            model.parallelize(self.ipu_config)
        elif self.ipu_config.recompute_checkpoint_every_layer:
            set_recomputation(model, True)

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """A fresh model from `model_init` (each `train()` builds one), with the IPU config's settings."""
        model = super().call_model_init(trial)
        self._prepare_model(model)
        if self.run.uses_fsdp:
            self._shard_embedding_group(model)
        return model

    def _shard_embedding_group(self, model: nn.Module) -> None:
        """Under --fsdp, a model whose embeddings' parameters are also registered outside them (BERT's MLM bias) is
        sharded here, with those registrations in the embeddings' unit; accelerate shards every other model."""
        group = output_embedding_group(model)
        if group is None:
            return
        plugin = self.accelerator.state.fsdp_plugin
        # accelerate resolves the layer class names of its wrap policy at every prepare, and finds none in a
        # sharded model (FSDP renames the classes): resolved here, on the model as it is, once for all.
        plugin.set_auto_wrap_policy(model)
        for param in model.parameters():  # FSDP2 wants float32 master weights under mixed precision, as accelerate
            if param.requires_grad and param.dtype != torch.float32 and self.run.precision.mixed_precision != "no":
                param.data = param.data.float()
        shard_with_embedding_group(model, plugin, group, plugin.transformer_cls_names_to_wrap or layers_to_wrap(model))

    @property
    def tokenizer(self) -> Any:
        """The `processing_class`, under the name optimum-graphcore (and transformers 4) used."""
        return self.processing_class

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self.processing_class = value

    @property
    def eval_data_collator(self) -> Callable:
        """The collator of evaluation and prediction batches: the one given as `eval_data_collator`, else
        `data_collator`."""
        return self._eval_data_collator if self._eval_data_collator is not None else self.data_collator

    @eval_data_collator.setter
    def eval_data_collator(self, value: Optional[Callable]) -> None:
        self._eval_data_collator = value

    @property
    def train_placement(self) -> Placement:
        return self.run.train_placement

    @property
    def eval_placement(self) -> Placement:
        return self.run.eval_placement

    @property
    def precision(self) -> Precision:
        return self.run.precision

    def _optimizer_cls_and_kwargs(self, args: IPUTrainingArguments, model: nn.Module) -> tuple[type, dict[str, Any]]:
        """The original's optimizer by default (poptorch's AdamW without bias correction, or LAMB with --lamb),
        else the upstream choice of --optim; its state in host memory for optimizer_state_offchip on a GPU, and
        sharded over the processes (ZeRO stage 1) for replicated_tensor_sharding. The original's parameter
        groups are made by `create_optimizer`."""
        if args.uses_lamb:
            optimizer_cls, optimizer_kwargs = Lamb, {
                "lr": args.learning_rate,
                "betas": (args.adam_beta1, args.adam_beta2),
                "eps": args.adam_epsilon,
                "bias_correction": not args.lamb_no_bias_correction,
                "max_weight_norm": POPTORCH_MAX_WEIGHT_NORM,
            }
        elif args.uses_original_optimizer:
            optimizer_cls, optimizer_kwargs = AdamW, {
                "lr": args.learning_rate,
                "betas": (args.adam_beta1, args.adam_beta2),
                "eps": args.adam_epsilon,
                "bias_correction": False,
                # torch's fused kernel where it has one (the Trainer's default optimizer is fused AdamW too).
                ("fused" if args.device.type in ("cpu", "cuda") else "foreach"): True,
            }
        else:
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        if self.run.precision.mixed_precision == "fp16" and optimizer_kwargs.get("fused"):
            # A fused optimizer takes the GradScaler's overflow flag into its kernel and is always "stepped", so
            # accelerate cannot tell that an overflowing update was skipped and the loop would advance the
            # learning-rate schedule anyway. The foreach implementation skips visibly; same update otherwise.
            optimizer_kwargs = {**optimizer_kwargs, "fused": False, "foreach": True}
        if self._offloads_optimizer_state(args):
            optimizer_cls = functools.partial(HostOffloadedOptimizer, optimizer_class=optimizer_cls)
        if self._shards_optimizer_state(args):
            # Each process keeps the optimizer state of 1/W of the parameters and broadcasts its updated
            # shard: the same update, 1/W of the state memory.
            return ShardedOptimizer, {"optimizer_class": optimizer_cls, **optimizer_kwargs}
        if isinstance(optimizer_cls, functools.partial):
            return optimizer_cls.func, {**optimizer_cls.keywords, **optimizer_kwargs}
        return optimizer_cls, optimizer_kwargs

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """With the original's optimizer, the original's parameter groups (`original_parameter_groups`: LAMB's
        biases without trust ratio); otherwise upstream's two groups for the --optim it builds."""
        if model is None and self.pipeline is not None:
            model = self.pipeline.stage_module  # each stage's process updates its stage's parameters
        if self.optimizer is None and self._builds_original_optimizer:
            opt_model = self.model if model is None else model
            groups = original_parameter_groups(opt_model, self.run.args.weight_decay, lamb=self.run.args.uses_lamb)
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer
        return super().create_optimizer(model)

    def _shards_optimizer_state(self, args: IPUTrainingArguments) -> bool:
        return self.run.shards_optimizer_state

    def _offloads_optimizer_state(self, args: IPUTrainingArguments) -> bool:
        return self.run.offloads_optimizer_state

    # ---- start-up log -------------------------------------------------------------------------------

    def _log_run_layout(self) -> None:
        device = self.args.device
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
        if self.run.device_model is not None:
            device_name += f", modelling an {self.run.device_model.title}"
            logger.warning("%s.", self.run.device_model.describe())
        lines = [f"device: {device} ({device_name})"]
        lines += self.run.describe()
        user_args = self.run.args
        optimizer = str(getattr(user_args.optim, "value", user_args.optim))
        if user_args.uses_original_optimizer and not self._builds_original_optimizer:
            optimizer = "the one given to IPUTrainer"
        elif user_args.uses_lamb:
            optimizer = ("LAMB" + (" without bias correction" if user_args.lamb_no_bias_correction else "")
                         + " (the original's: biases take plain Adam steps)")
        elif user_args.uses_original_optimizer:
            optimizer = "AdamW without bias correction (the original's)"
        lines.append(f"optimizer: {optimizer}, weight decay {user_args.weight_decay} (not on biases and LayerNorm "
                     f"weights); gradient clipping: " + (f"max norm {user_args.max_grad_norm}" if user_args.max_grad_norm
                                                         else "off"))
        recompute = self.ipu_config.recompute_checkpoint_every_layer
        lines.append("recomputation: " + ("every layer (activation checkpointing)" if recompute else "off"))
        chunks = num_projection_chunks(self.ipu_config)
        if chunks > 1 and not hasattr(self.model, "parallelize"):
            lines.append(f"vocabulary projection: in one piece ({type(self.model).__name__} has no chunked head)")
        elif chunks > 1:
            lines.append(f"vocabulary projection: computed in {chunks} chunks")
        tensorboard = tensorboard_line(self.args)
        if tensorboard:
            lines.append(tensorboard)
        logger.info("***** IPU config on this machine *****\n  " + "\n  ".join(lines))
        departures = user_args.departures_from_original()
        if departures:
            logger.warning("This run departs from the original's math, as asked: %s", "; ".join(departures))
        ipu_only = self.run.ipu_only_settings()
        if ipu_only:
            settings = ", ".join(f"{name}={value!r}" for name, value in ipu_only.items())
            logger.info("IPU-only settings with no effect on %s: %s", device.type.upper(), settings)

    # ---- precision ----------------------------------------------------------------------------------

    def create_accelerator_and_postprocess(self) -> None:
        """Upstream's accelerator, with the float16 loss scaler of the run: accelerate builds a default
        `GradScaler` for fp16; it is replaced, before anything is prepared, by one that starts at
        `--loss_scaling` and grows only with `--auto_loss_scaling` (static otherwise)."""
        super().create_accelerator_and_postprocess()
        if self.run.uses_fsdp and not self.is_fsdp_enabled:
            shard_cpu_processes(self.accelerator, self.args.fsdp_plugin_args)  # accelerate shards GPU runs only
            self.is_fsdp_enabled = True
        if self.run.uses_fsdp and self.model is not None:
            self._shard_embedding_group(self.model)
        scaler = self.run.precision.grad_scaler(self.args.device.type)
        if scaler is not None:
            self.accelerator.scaler = scaler
            if self.run.device_model is not None:
                # accelerate applies float16 autocast only on a GPU; a modelled one runs the same autocast and
                # GradScaler on CPU tensors, as accelerate would switch them on for CUDA.
                self.accelerator.native_amp = True

    # ---- data ---------------------------------------------------------------------------------------

    def _padded_on_batch_axis(
        self, batch_size: int, make_loader: Callable[[], Any], collator: Optional[Callable] = None
    ) -> Any:
        """`make_loader()` with `collator` (default `data_collator`) as the collator, wrapped by
        `pad_on_batch_axis` when --pad_on_batch_axis is set."""
        original = self.data_collator
        collator = original if collator is None else collator
        if self.args.pad_on_batch_axis:
            collator = pad_on_batch_axis(batch_size, collator)
        if collator is original:
            return make_loader()
        self.data_collator = collator
        try:
            return make_loader()
        finally:
            self.data_collator = original

    def get_train_dataloader(self):
        batch_size = self.train_placement.process_batch_size
        return self._padded_on_batch_axis(batch_size, super().get_train_dataloader)

    def get_eval_dataloader(self, eval_dataset=None):
        batch_size = self.eval_placement.process_batch_size
        with self._evaluation_drop_last():
            return self._padded_on_batch_axis(
                batch_size, lambda: super(IPUTrainer, self).get_eval_dataloader(eval_dataset), self.eval_data_collator
            )

    def get_test_dataloader(self, test_dataset):
        batch_size = self.eval_placement.process_batch_size
        with self._evaluation_drop_last():
            return self._padded_on_batch_axis(
                batch_size, lambda: super(IPUTrainer, self).get_test_dataloader(test_dataset), self.eval_data_collator
            )

    @contextlib.contextmanager
    def _evaluation_drop_last(self):
        """Upstream builds every dataloader with the one `dataloader_drop_last`; the loop's arguments carry the
        training value (by default True, as the original), evaluation gets its own while its loader is built."""
        training_value = self.args.dataloader_drop_last
        self.args.dataloader_drop_last = self.run.eval_drop_last
        try:
            yield
        finally:
            self.args.dataloader_drop_last = training_value

    # ---- optimisation -------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: Any = None, trial: Any = None, ignore_keys_for_eval: Any = None,
              **kwargs: Any) -> TrainOutput:
        """Upstream's training loop, made safe to stop and resume; with --compile_only, `compile_only()` instead
        (compile, then stop).

        `resume_from_checkpoint=True` takes the newest complete and loadable checkpoint of the output folder
        (saying which newer ones it skipped), and a given checkpoint is checked the same way. A checkpoint that
        already reached the last step is loaded without training again. SIGTERM / SIGINT save a checkpoint at the
        end of the step and raise `TrainingInterrupted`; a checkpoint that cannot be written (a full disk) raises
        `CheckpointWriteError`, its partial folder removed and the previous checkpoint left resumable.
        """
        if self.args.compile_only:
            return self.compile_only()
        if self._scheduler_from_factory:
            # A schedule built for an earlier train() call is bound to that call's optimizer.
            self.lr_scheduler, self._scheduler_from_factory = None, False
        checkpoint = self._checkpoint_to_resume(resume_from_checkpoint)
        if self.pipeline is not None:
            # The loop trains what it finds as the wrapped model (this process's stage, in DDP over its data-parallel
            # group) and then leaves the model unprepared: no DDP over all processes around the whole model.
            self.model_wrapped = self.pipeline.module
        if checkpoint is not None:
            finished = self._already_finished(checkpoint)
            if finished is not None:
                return finished
        with StopOnSignal(self._step_timer) as stop, _silence_completion_after_a_signal(stop):
            self._stop_on_signal.stop = stop
            try:
                output = super().train(resume_from_checkpoint=checkpoint, trial=trial,
                                       ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
            except (OSError, RuntimeError) as error:
                if self._checkpoint_in_progress is None:
                    raise
                raise self._checkpoint_write_error(error) from error
            finally:
                self._stop_on_signal.stop = None
        if stop.signal_number is not None:
            name = signal.Signals(stop.signal_number).name
            raise TrainingInterrupted(
                f"interrupted by {name} at step {self.state.global_step}: checkpoint-{self.state.global_step} is saved "
                f"in {self.args.output_dir}, and the same command resumes from it (with or without "
                "--overwrite_output_dir)",
                stop.signal_number,
            )
        return output

    def _checkpoint_to_resume(self, requested: Any) -> Optional[str]:
        """The checkpoint `train(resume_from_checkpoint=...)` resumes from, checked: True means the newest
        complete one of the output folder; a path must be complete and loadable. Process 0 decides for every
        process (an error is raised on all of them): each process looking for itself could pick another
        checkpoint, e.g. with an output folder local to each machine, and resume from other weights."""
        if requested is None or requested is False:
            return None
        return decided_by_process_zero(lambda: self._find_checkpoint(requested), self.args.process_index)

    def _find_checkpoint(self, requested: Any) -> str:
        needs_optimizer = not self.args.save_only_model
        if requested is True:
            checkpoint, skipped = last_resumable_checkpoint(self.args.output_dir, needs_optimizer)
            if skipped:
                logger.warning("Skipped checkpoint(s) that cannot be resumed from: %s", "; ".join(map(str, skipped)))
            if checkpoint is None:
                raise ValueError(f"no complete checkpoint to resume from in {self.args.output_dir}")
            return checkpoint
        problem = checkpoint_problem(str(requested), needs_optimizer)
        if problem is not None:
            newest, _ = last_resumable_checkpoint(os.path.dirname(os.path.normpath(str(requested))), needs_optimizer)
            hint = f"; the newest complete checkpoint there is {newest}" if newest else ""
            raise ValueError(f"--resume_from_checkpoint {requested}: cannot resume from it: {problem}{hint}")
        return str(requested)

    def _already_finished(self, checkpoint: str) -> Optional[TrainOutput]:
        """When `checkpoint` already reached the run's last step, load its weights and state instead of training:
        upstream would train one step past the end."""
        state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        max_steps = self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]
        if state.global_step < max_steps:
            return None
        logger.info("%s already reached the last step (%d of %d): loading it instead of training.",
                    checkpoint, state.global_step, max_steps)
        self._load_from_checkpoint(checkpoint)
        self.state = state
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        training_loss = sum(losses) / len(losses) if losses else float("nan")
        return TrainOutput(state.global_step, training_loss, {"train_loss": training_loss, "epoch": state.epoch})

    def _checkpoint_write_error(self, error: BaseException) -> CheckpointWriteError:
        """One line for a checkpoint that could not be written, after removing its partial folder."""
        folder = self._checkpoint_in_progress
        self._checkpoint_in_progress = None
        output_dir = self.args.output_dir
        previous, _ = last_resumable_checkpoint(output_dir, needs_optimizer=not self.args.save_only_model)
        needed = folder_bytes(previous) if previous else folder_bytes(folder) if os.path.isdir(folder) else 0
        if self.args.should_save and os.path.isdir(folder):
            shutil.rmtree(folder, ignore_errors=True)  # written by this run, and unusable
        free = shutil.disk_usage(output_dir).free
        full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or free < needed
        reason = "no space left on the device" if full else one_line(error)
        resume = (f"{os.path.basename(previous)} is complete: run the same command again to resume from it"
                  if previous else "no earlier checkpoint exists, so a rerun starts afresh")
        return CheckpointWriteError(
            f"could not write {folder} ({reason}): {free / 1e9:.2f} GB free in {output_dir}, a checkpoint needs about "
            f"{needed / 1e9:.2f} GB; free some space or choose another --output_dir. {resume}"
        )

    def create_scheduler(self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None):
        if self.lr_scheduler is None and self.scheduler_factory is not None:
            self.lr_scheduler = self.scheduler_factory(
                optimizer or self.optimizer,
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
                num_training_steps=num_training_steps,
            )
            self._scheduler_from_factory = True
        elif self.lr_scheduler is None and self._scheduler_partial is not None:
            self.lr_scheduler = _call_scheduler_partial(
                self._scheduler_partial, optimizer or self.optimizer,
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps), num_training_steps=num_training_steps,
            )
            self._scheduler_from_factory = True
        return super().create_scheduler(num_training_steps, optimizer)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """Run one step: `device_iterations` weight updates over the micro-batches of this batch.

        Each update accumulates the gradients of up to `micro_batches_per_update` micro-batches, each loss
        divided by the number of micro-batches in that update (their mean). All updates but the last are
        applied here; the upstream loop applies the last one, then advances the schedule once.
        """
        if self.pipeline is not None:
            rows = self.train_placement.micro_batch_size * self.train_placement.micro_batches_per_update
            return self.pipeline.training_step(inputs, rows, lambda: self._apply_update(model))
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = send_to_device(inputs, self.args.device)
        micro_batches = split_batch(inputs, self.train_placement.micro_batch_size)
        per_update = self.train_placement.micro_batches_per_update
        updates = [micro_batches[i : i + per_update] for i in range(0, len(micro_batches), per_update)]

        total_loss = torch.zeros((), device=self.args.device)
        for update_index, update in enumerate(updates):
            for index, micro_batch in enumerate(update):
                # Processes all-reduce gradients once per update, on its last micro-batch. Under --fsdp they are
                # reduce-scattered on every micro-batch instead: deferring would keep each process's whole
                # unsharded gradient until the last one, the memory FSDP exists to save (same average either way).
                defer = index < len(update) - 1 and not self.run.uses_fsdp
                with self.accelerator.no_sync(model) if defer else contextlib.nullcontext():
                    with self.compute_loss_context_manager():
                        loss = self.compute_loss(model, micro_batch)
                    total_loss += loss.detach().float()
                    self.accelerator.backward(loss / len(update))  # scaled by the float16 GradScaler, if any
            if update_index < len(updates) - 1:
                self._apply_update(model)
        steps = self.args.torch_empty_cache_steps
        if steps and self.state.global_step % steps == 0:
            clear_device_cache()
        return total_loss / len(micro_batches)

    def _apply_update(self, model: nn.Module) -> None:
        """One of the device iterations inside a step, clipped and applied like the loop's own update (with a
        float16 GradScaler: unscaled, and skipped on overflow)."""
        if self.args.max_grad_norm is not None and self.args.max_grad_norm > 0:
            self._clip_grad_norm(model)
        self.optimizer.step()
        if self.static_loss_scale_guard is not None:
            self.static_loss_scale_guard.record()
        model.zero_grad()

    # ---- throughput log -----------------------------------------------------------------------------

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """Upstream's FLOP estimate for `total_flos`. The loop calls it once per training batch, so the
        throughput meter counts the batch here (without waiting for the device)."""
        self.throughput.count_batch(inputs)
        return super().floating_point_ops(inputs)

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Upstream's log, with samples/s, tokens/s (and MFU on a known GPU) on each training log line."""
        if "loss" in logs:  # a training step's line; evaluation and end-of-training metrics have other keys
            logs.update(self.throughput.window_metrics())
        super().log(logs, start_time)

    # ---- checkpoints --------------------------------------------------------------------------------

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Upstream's model (and tokenizer) save, plus the run's `ipu_config.json`; `training_args.bin`
        records the user's arguments rather than the loop's copy. The save is one log line (`upstream_save_quiet`):
        a checkpoint's once it is complete (`_CheckpointCompletion`), the final model's here."""
        checkpoint = _internal_call and output_dir is not None
        if checkpoint:
            self._checkpoint_in_progress = output_dir  # a checkpoint save starts here; _CheckpointCompletion ends it
            self._shutdown_check.save_started()
        folder = output_dir if output_dir is not None else self.args.output_dir
        if self.pipeline is not None:
            self.pipeline.sync_weights()  # process 0 saves the whole model, every stage's current weights
        with upstream_save_quiet():
            super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            if self.pipeline is not None and checkpoint:
                self.pipeline.save_layout(folder)  # which layout the checkpoint's optimizer parts belong to
            self.ipu_config.save_pretrained(folder)
            torch.save(self.run.args, os.path.join(folder, TRAINING_ARGS_NAME))
            if not checkpoint:
                size = sum(entry.stat().st_size for entry in os.scandir(folder) if entry.is_file())
                logger.info("Saved the model to %s (%s)", folder, readable_size(size))

    # ---- Private upstream touchpoints ---------------------------------------------------------------
    # Upstream writes optimizer.pt from process 0 alone, so ZeRO shards must be gathered (a collective on
    # every process) before it does; no public hook runs at that moment. Upstream also reads optimizer.pt
    # straight onto the GPU when there are several processes, before any optimizer can keep just its part;
    # no public hook runs between that read and `load_state_dict`. `_already_finished` loads a checkpoint's
    # weights through upstream's `_load_from_checkpoint`, the loader that knows every weight layout.
    # --pipeline: upstream clips and measures the gradient norm in `_clip_grad_norm` / `_get_grad_norm` over the
    # parameters of the model it holds, one stage in a pipelined process; no public hook computes that norm. And
    # `train` hands the loop the stage as `model_wrapped`, which upstream then does not prepare (no DDP over every
    # process around the whole model): its `use_accelerator_prepare = model is self.model`.
    # tests/test_trainer.py and tests/test_pipeline.py fail by name if upstream renames or stops calling any of them.

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """--pipeline: the norm over every stage, not this process's stage alone (upstream's `_clip_grad_norm`)."""
        if self.pipeline is not None:
            return self.pipeline.clip_grad_norm_(self.accelerator, self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """--pipeline: the logged norm is every stage's (upstream's `_get_grad_norm` computes it without clipping)."""
        if self.pipeline is not None and grad_norm is None:
            return self.pipeline.clip_grad_norm_(self.accelerator, float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        prepare_optimizer_for_checkpoint(self.optimizer, self.args.device)  # a sharded state is gathered on process 0
        if self.pipeline is not None:
            self.pipeline.save_optimizer_part(self.optimizer, output_dir)  # stage 0's is upstream's optimizer.pt
        super()._save_optimizer_and_scheduler(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        """Upstream's loading, except that the state of a sharded or host-offloaded optimizer is read into host
        memory. Upstream maps optimizer.pt onto the device when there are several processes: the whole state on
        every GPU, before ZeRO keeps its 1/W or the offload moves it to the host, which runs out of GPU memory
        for exactly the models those settings exist for. Both optimizers' `load_state_dict` put each tensor
        where they keep it (the GPU for a shard's parameters, host memory when offloaded)."""
        if checkpoint is not None and self.pipeline is None:
            check_checkpoint_layout(checkpoint, None)
        # Under --fsdp upstream loads through torch's set_optimizer_state_dict, which fails on a state without any
        # tensor (plain SGD's): such a state is only hyper-parameters, taken here instead.
        stateless_fsdp = (checkpoint is not None and self.is_fsdp_enabled
                          and holds_no_tensor_state(os.path.join(checkpoint, FSDP_OPTIMIZER_NAME)))
        if self.pipeline is None and (checkpoint is None
                                      or not (_places_its_own_state(self.optimizer) or stateless_fsdp)):
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        optimizer_name = FSDP_OPTIMIZER_NAME if stateless_fsdp else OPTIMIZER_NAME
        optimizer_file, scheduler_file = (os.path.join(checkpoint, name) for name in (optimizer_name, SCHEDULER_NAME))
        if self.pipeline is not None:  # each stage reads its own part of the optimizer state
            optimizer_file = self.pipeline.optimizer_part(checkpoint)
        if not (os.path.isfile(optimizer_file) and os.path.isfile(scheduler_file)):
            return  # as upstream: a checkpoint saved without them (--save_only_model) resumes the weights only
        check_torch_load_is_safe()
        # Memory-mapped: the processes of a machine share one copy of the file's pages, and each reads the parts
        # it keeps, instead of every process holding the whole state in host memory at once.
        saved = torch.load(optimizer_file, map_location="cpu", weights_only=True, mmap=True)
        if stateless_fsdp:
            load_hyperparameters(self.optimizer, saved)
        else:
            self.optimizer.load_state_dict(saved)
        with warnings.catch_warnings(record=True) as caught_warnings:
            self.lr_scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True))
        reissue_pt_warnings(caught_warnings)

    # ---- evaluation -------------------------------------------------------------------------------------

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        if self.pipeline is not None:
            self.pipeline.sync_weights()  # the evaluation stages may be split otherwise than the training ones
        return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        if self.pipeline is not None:
            self.pipeline.sync_weights()
        return super().predict(*args, **kwargs)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: Optional[list[str]] = None) -> Any:
        """--pipeline: upstream's prediction step on a forward that runs through the evaluation stages."""
        if self.pipeline is not None:
            model = self.pipeline.evaluation_module(self.model)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    # ---- compile only -------------------------------------------------------------------------------

    def compile_only(self) -> TrainOutput:
        """Compile the model on one micro-batch (forward and backward) and stop, as `--compile_only` asks."""
        dataset = self.train_dataset if self.train_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("--compile_only needs a dataset to take one batch from (--do_train or --do_eval data)")
        loader = self.get_train_dataloader() if self.train_dataset is not None else self.get_eval_dataloader()
        batch = send_to_device(next(iter(loader)), self.args.device)
        micro_batch = split_batch(batch, self.train_placement.micro_batch_size)[0]
        self.model.to(self.args.device)
        compiled = torch.compile(self.model)
        start = time.perf_counter()
        compiled.train()
        with self.accelerator.autocast():
            loss = self.compute_loss(compiled, micro_batch)
        loss.backward()
        self.model.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default inductor cache")
        logger.info(
            "--compile_only: model compiled in %.1f s (loss %.4f on one micro-batch); kernels cached in %s. "
            "Stopping without training.", seconds, loss.item(), cache,
        )
        return TrainOutput(global_step=0, training_loss=float(loss.item()), metrics={"compile_seconds": seconds})


def _places_its_own_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the run's optimizer (under accelerate's wrapper) is one that puts loaded state where it keeps it."""
    return find_wrapped_optimizer(optimizer, (ShardedOptimizer, HostOffloadedOptimizer)) is not None


class _CheckpointCompletion(TrainerCallback):
    """After upstream has written `checkpoint-N` (every process its part), process 0 flushes it and writes the
    completion marker, then rotates old checkpoints (`--save_total_limit`, applied here rather than by upstream so
    that nothing is removed before the new checkpoint is complete)."""

    def __init__(self, trainer: IPUTrainer) -> None:
        self.trainer = trainer

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        trainer = self.trainer
        folder = trainer._checkpoint_in_progress
        if folder is None:
            return control
        trainer.accelerator.wait_for_everyone()  # every process's files (rng_state_<rank>.pth) are written
        if args.should_save:
            mark_complete(folder)
            logger.info("Saved %s (%s)", os.path.basename(folder), readable_size(folder_bytes(folder)))
            best = (state.best_model_checkpoint,) if state.best_model_checkpoint else ()
            rotate_checkpoints(args.output_dir, trainer.run.args.save_total_limit, keep=best)
        trainer._checkpoint_in_progress = None
        return control
