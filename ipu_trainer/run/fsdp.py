"""`--fsdp`: the IPU config's run with the model, gradients and optimizer state sharded over the processes (FSDP2).

On IPUs a model too big for one chip was split over several (`ipus_per_replica` > 1); here each process must
hold a whole replica, unless FSDP shards it: each process keeps 1/W of the parameters, gradients and optimizer
state, and all-gathers a layer's parameters just before it runs. The sharding is upstream's: transformers hands
`--fsdp` / `--fsdp_config` to accelerate, which applies `torch.distributed.fsdp.fully_shard` (FSDP2) when the
trainer prepares the model. This module only decides what accelerate is given, from the resolved run:

- the IPU config's meaning stays: one weight update averages replicas x accumulation micro-batches. FSDP2
  reduce-scatters (averages over the processes) and accumulates into the sharded gradient, so the loss of each
  micro-batch divided by the micro-batches of the update gives the same average as the DDP path;
- `replicated_tensor_sharding` is implied (FSDP shards the optimizer state itself: no ZeRO optimizer on top);
- `optimizer_state_offchip` (on a GPU, or modelling one) becomes FSDP2's `CPUOffloadPolicy`: parameters,
  gradients and the optimizer step live in host memory;
- mixed precision: FSDP2 computes in the run's half precision (`param_dtype`) and reduces gradients in float32
  (accelerate's default would reduce in the half precision, which changes the numbers against the DDP path,
  whose gradients are float32);
- only FSDP2 is used (`fsdp_config["version"]` 1 is refused): FSDP1 is deprecated upstream. `hybrid_shard` is
  FSDP1-only in transformers' `--fsdp` options, so it is refused with what to use instead.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

import torch

# The `--fsdp` options transformers' FSDP2 path takes (its legacy string form); `auto_wrap` is its default.
FSDP2_OPTIONS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")
FSDP1_ONLY_OPTIONS = ("hybrid_shard", "hybrid_shard_zero2", "no_shard")


def check_fsdp_options(fsdp: Any, fsdp_config: Any) -> None:
    """Refuse the `--fsdp` / `--fsdp_config` values that are not FSDP2 (one line each, naming the flag)."""
    items = fsdp.split() if isinstance(fsdp, str) else list(fsdp) if isinstance(fsdp, (list, tuple)) else []
    for item in items:
        if item in FSDP1_ONLY_OPTIONS:
            raise ValueError(
                f"--fsdp {item} is not supported: transformers offers it only with FSDP1, which is deprecated; use "
                "--fsdp full_shard (or shard_grad_op) over all the processes, or, across machines with a slow network, "
                "plain replicas with replicated_tensor_sharding (ZeRO stage 1) in the IPU config"
            )
        if item not in FSDP2_OPTIONS:
            raise ValueError(f"--fsdp {item} is not a known option: use full_shard, shard_grad_op, offload")
    if isinstance(fsdp_config, dict):
        config = {key.removeprefix("fsdp_"): value for key, value in fsdp_config.items()}
        version = config.get("version", 2)
        if int(version) != 2:
            raise ValueError(f"--fsdp_config version={version} is not supported: only FSDP2 (version 2) is used")
        state_dict_type = str(config.get("state_dict_type", "FULL_STATE_DICT"))
        if state_dict_type != "FULL_STATE_DICT":
            # A sharded checkpoint would hold no model.safetensors: neither checkpoints.py's completeness check
            # nor from_pretrained could read it.
            raise ValueError(f"--fsdp_config state_dict_type={state_dict_type} is not supported: checkpoints are "
                             "written with FULL_STATE_DICT (gathered on process 0), leave it out")


def check_fsdp_processes(world_size: int) -> None:
    """FSDP shards over processes: one process has nothing to shard over (and accelerate cannot start it)."""
    if world_size < 2:
        raise ValueError(
            "--fsdp shards the model over several processes, but this run has one: start it with torchrun "
            "--nproc_per_node N (N >= 2), or leave out --fsdp"
        )


def layers_to_wrap(model: torch.nn.Module) -> Optional[list[str]]:
    """The model's layer classes (`_no_split_modules`) that can be FSDP units of their own: those holding no
    parameter shared with the rest of the model. BERT lists `BertEmbeddings`, whose word embeddings are tied to
    the MLM decoder: sharding it alone would give the embeddings a new parameter and leave the decoder the old
    one (the tie broken, then the embedding sharded twice). accelerate keeps tied input and output embeddings in
    one unit itself when no layer class holds them. None when the model names no layer classes."""
    names = getattr(model, "_no_split_modules", None)
    if not names:
        return None
    uses = Counter(id(param) for _, param in model.named_parameters(remove_duplicate=False))
    kept = []
    for name in names:
        instances = [module for module in model.modules() if type(module).__name__ == name]
        shared = any(
            uses[id(param)] > inside
            for module in instances
            for param, inside in Counter(p for _, p in module.named_parameters(remove_duplicate=False)).items()
        )
        if instances and not shared:
            kept.append(name)
    return kept


def output_embedding_group(model: torch.nn.Module) -> Optional[list[torch.nn.Module]]:
    """The modules that must be one FSDP unit with the output embeddings, when accelerate's own grouping cannot
    hold them; None when it can.

    FSDP2 refuses a parameter visible from two units. accelerate makes one unit of the input and the output
    embeddings (when their weights are tied) and leaves everything else outside the layers to the root unit. BERT's
    MLM head registers its output bias twice, as `cls.predictions.decoder.bias` and `cls.predictions.bias`: the
    second registration falls in the root unit while the first is in accelerate's, and sharding fails. The unit
    returned here holds every module that registers a parameter of the embeddings (for BERT the word embeddings and
    the whole `cls.predictions`), keeping only the outermost of nested ones."""
    input_embed = getattr(model, "get_input_embeddings", lambda: None)()
    output_embed = getattr(model, "get_output_embeddings", lambda: None)()
    if output_embed is None:
        return None
    embedded = {id(p) for module in (input_embed, output_embed) if module is not None for p in module.parameters()}
    registering = [module for module in model.modules()
                   if any(id(p) in embedded for _, p in module.named_parameters(recurse=False, remove_duplicate=False))]
    inside = {id(module) for embed in (input_embed, output_embed) if embed is not None for module in embed.modules()}
    if all(id(module) in inside for module in registering):
        return None  # every registration is inside the embeddings: accelerate's unit holds them
    candidates = [module for module in [input_embed, output_embed, *registering] if module is not None]
    outermost: list[torch.nn.Module] = []
    for module in candidates:
        nested = any(other is not module and any(sub is module for sub in other.modules()) for other in candidates)
        if not nested and all(kept is not module for kept in outermost):
            outermost.append(module)
    if any(module is model for module in outermost):
        raise ValueError(f"--fsdp cannot shard {type(model).__name__}: its output embeddings' parameters are "
                         "registered on the model itself; train it without --fsdp")
    return outermost


def shard_with_embedding_group(model: torch.nn.Module, plugin: Any, group: list[torch.nn.Module],
                               layer_classes: Optional[list[str]]) -> None:
    """Apply FSDP2 to `model` as accelerate would (each layer of `layer_classes` a unit, the embeddings a unit
    kept gathered from the forward to the backward, the rest the root unit, the plugin's resharding, offload
    and mixed precision), with `group` as the embeddings' unit. accelerate then finds the model sharded and
    leaves it as it is; its optimizer, clipping and checkpoint code work on it as on a model it sharded."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"reshard_after_forward": plugin.reshard_after_forward, "offload_policy": plugin.cpu_offload,
              "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
    grouped = {id(sub) for module in group for sub in module.modules()}
    names = set(layer_classes or [])
    layers = [module for module in model.modules() if type(module).__name__ in names and id(module) not in grouped]
    for layer in reversed(layers):  # innermost first, as accelerate does
        fully_shard(layer, **kwargs)
    fully_shard(group, **{**kwargs, "reshard_after_forward": False})
    fully_shard(model, **kwargs)


def fsdp_plugin_arguments(
    plugin_args: dict[str, Any], compute_dtype: torch.dtype, cpu_offload: bool,
    layer_classes: Optional[list[str]] = None, pin_memory: bool = True,
) -> dict[str, Any]:
    """transformers' FSDP plugin arguments (from `--fsdp` / `--fsdp_config`) with the run's decisions on top: the
    mixed precision policy with float32 reductions, host offload for `optimizer_state_offchip` (in pinned memory on
    a GPU; a CPU run, modelling a GPU or not, has no pinned memory: torch refuses to pin without an accelerator), and
    the layer classes to shard one by one (`layers_to_wrap`) unless `--fsdp_config transformer_layer_cls_to_wrap`
    names them."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    arguments = dict(plugin_args)
    if layer_classes and "transformer_cls_names_to_wrap" not in arguments:
        arguments["transformer_cls_names_to_wrap"] = ",".join(layer_classes)
    # param_dtype None keeps float32 parameters for the computation (a float32 run); float32 reductions either way.
    param_dtype: Optional[torch.dtype] = None if compute_dtype == torch.float32 else compute_dtype
    arguments["mixed_precision_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        arguments["cpu_offload"] = CPUOffloadPolicy(pin_memory=pin_memory)
    return arguments


def fsdp_description(reshard_after_forward: bool, cpu_offload: bool, world_size: int) -> str:
    """The start-up log's line for the optimizer state (and everything else FSDP shards)."""
    mode = "full_shard" if reshard_after_forward else "shard_grad_op"
    where = "host memory (CPUOffloadPolicy)" if cpu_offload else "device memory"
    return (f"parameters, gradients and optimizer state sharded over {world_size} processes (FSDP2 {mode}, "
            f"gradients reduce-scattered in float32 every micro-batch), in {where}")


# ---- Private upstream touchpoint ------------------------------------------------------------------------------
# accelerate turns FSDP on only for GPU-like processes (its AcceleratorState ignores the FSDP plugin of a
# MULTI_CPU run), while torch's fully_shard shards CPU tensors over gloo as well. A CPU run under torchrun (and a
# --device_model run modelling GPUs) is switched to accelerate's FSDP path here, so that it runs the same upstream
# code as on GPUs: preparation, clipping, the optimizer, checkpoints. No public setting does this. The one place;
# tests/test_fsdp.py fails by name if accelerate changes the attributes it sets.


def shard_cpu_processes(accelerator: Any, plugin_args: dict[str, Any]) -> None:
    """Put a multi-process CPU `accelerator` on accelerate's FSDP2 path, with the plugin built from `plugin_args`
    (as transformers builds it for a GPU run). Does nothing where accelerate already did it."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if getattr(state, "fsdp_plugin", None) is not None:
        return
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"--fsdp: accelerate did not set up FSDP on a {state.distributed_type} run")
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)  # as AcceleratorState does (keeps a given policy)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    # Every later AcceleratorState() copies PartialState's shared state over its own; accelerate records its FSDP
    # choice there too (AcceleratorState.__init__), or the next one would read MULTI_CPU again.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
