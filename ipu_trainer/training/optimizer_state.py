"""Where the optimizer state lives: in host memory (`optimizer_state_offchip` on a GPU) or sharded over the
data-parallel processes (`replicated_tensor_sharding`, ZeRO stage 1), and how a checkpoint gathers it."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer


def wait_for_device_to_host_copies(device: torch.device) -> None:
    """Block until the copies from `device` into host memory started with `non_blocking=True` have landed.

    A copy from a GPU into pinned host memory is only queued on the device's stream: the call returns at once
    and the host tensor holds its old bytes until the device gets there, so a host reader (`torch.save`, an
    update on the CPU) must wait for the device first. Copies from a CPU tensor are done when the call returns.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StateOfDeviceParameters(Mapping):
    """The host optimizer's state, keyed by the model's parameters (the ones in `param_groups`), read live."""

    def __init__(self, host_state: dict, host_of: dict[torch.Tensor, torch.Tensor],
                 device_of: dict[torch.Tensor, torch.Tensor]) -> None:
        self._host_state = host_state
        self._host_of = host_of
        self._device_of = device_of

    def __getitem__(self, device_param: torch.Tensor) -> Any:
        return self._host_state[self._host_of[device_param]]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self._device_of[host_param] for host_param in list(self._host_state))

    def __len__(self) -> int:
        return len(self._host_state)


class HostOffloadedOptimizer(torch.optim.Optimizer):
    """An optimizer whose state lives in host memory (`optimizer_state_offchip: true` on a GPU).

    Each update copies the parameters and gradients to float32 host buffers, runs `optimizer_class`
    there, and copies the new parameters back. The device then holds no optimizer state (Adam's two
    moments are twice the model's size) at the price of three parameter-sized transfers per update,
    small beside an update of thousands of sequences. The host copies are refreshed from the device
    every update, so weights loaded into the model after this optimizer was built are never lost.

    `param_groups` hold the model's parameters, as any optimizer's do: whatever works on the gradients before
    `step()` works on the ones that exist, on the device. The float16 `GradScaler` unscales and inf-checks
    them there, and skips `step()` after an overflow; the host copies have no gradient until `step()` copies
    it in (after the first update, the previous update's). The host optimizer has its own groups: their
    hyper-parameters (a scheduler's learning rate) are taken from `param_groups` before each host update and
    each `state_dict()`, and `state` is the host optimizer's, keyed by the model's parameters.

    The transfers are asynchronous; why no host tensor is read or handed out while one is in flight:
    - the copies into the host buffers (parameters, gradients) are waited for before the host update
      reads them;
    - the copies back to the device, queued at the end of `step()`, only read the host parameters. The
      only later writes to those buffers are the next `step()`'s copies from the device, queued on the
      same stream and therefore run after them; the host update writes them only after the wait;
    - the state (`state_dict()`) is written by the host update alone, never by a copy, so it is
      complete whenever `step()` has returned.
    """

    def __init__(self, params: Any, optimizer_class: type, **optimizer_kwargs: Any) -> None:
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        pin = torch.cuda.is_available()  # pinned memory needs a CUDA driver; a CPU (or a device model) has none
        self._device_params: list[torch.Tensor] = []
        self._host_params: list[torch.Tensor] = []
        host_groups = []
        for group in groups:
            host_params = []
            for param in group["params"]:
                host = torch.empty(param.shape, dtype=torch.float32, pin_memory=pin)
                host.copy_(param.detach())
                host_params.append(host)
                self._device_params.append(param)
                self._host_params.append(host)
            host_groups.append({**group, "params": host_params})
        self.optimizer = optimizer_class(host_groups, **optimizer_kwargs)
        device_groups = [{**host_group, "params": group["params"]}
                         for host_group, group in zip(self.optimizer.param_groups, groups, strict=True)]
        super().__init__(device_groups, self.optimizer.defaults)
        self._share_host_state()

    def _share_host_state(self) -> None:
        self.state = _StateOfDeviceParameters(  # type: ignore[assignment]
            self.optimizer.state, dict(zip(self._device_params, self._host_params)),
            dict(zip(self._host_params, self._device_params)))

    def device_parameters(self) -> list[torch.Tensor]:
        """The model's parameters, in the order of the host parameters (the numbering of `state_dict()`)."""
        return list(self._device_params)

    def _hyperparameters_to_host(self) -> None:
        for group, host_group in zip(self.param_groups, self.optimizer.param_groups, strict=True):
            host_group.update({key: value for key, value in group.items() if key != "params"})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if closure is not None:
            raise ValueError("HostOffloadedOptimizer does not take a closure")
        for device_param, host_param in zip(self._device_params, self._host_params):
            host_param.copy_(device_param, non_blocking=True)
            if device_param.grad is None:
                host_param.grad = None  # an update skipped for this parameter stays skipped
                continue
            if host_param.grad is None:
                host_param.grad = torch.empty_like(host_param, pin_memory=host_param.is_pinned())
            host_param.grad.copy_(device_param.grad, non_blocking=True)
        for device in {param.device for param in self._device_params}:
            wait_for_device_to_host_copies(device)
        self._hyperparameters_to_host()
        self.optimizer.step()
        for device_param, host_param in zip(self._device_params, self._host_params):
            device_param.copy_(host_param, non_blocking=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self._device_params:
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.zero_()

    def state_dict(self) -> dict:
        self._hyperparameters_to_host()
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)  # state follows the host parameters' device
        # Loading replaces the host optimizer's groups (hyper-parameters included) and state.
        for group, host_group in zip(self.param_groups, self.optimizer.param_groups, strict=True):
            group.update({key: value for key, value in host_group.items() if key != "params"})
        self._share_host_state()


def model_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The model parameters `optimizer` updates, in the order its `state_dict()` numbers them."""
    if isinstance(optimizer, HostOffloadedOptimizer):
        return optimizer.device_parameters()
    return [param for group in optimizer.param_groups for param in group["params"]]


class ShardedOptimizer(ZeroRedundancyOptimizer):
    """ZeRO stage 1: each process keeps the optimizer state of its share of the parameters.

    `state_dict()` is the whole state on the process it was consolidated to (`prepare_optimizer_for_checkpoint`
    does that for checkpoints), numbered like an unsharded optimizer's state, so a checkpoint resumes on any
    number of processes, sharded or not. Before any consolidation, e.g. when accelerate moves the fresh
    optimizer's state to the device, it is this process's own shard, which `load_state_dict` takes back as it is.
    """

    _holds_consolidated_state = False  # whether the last consolidation was to this process and is not handed out yet

    def consolidate_state_dict(self, to: int = 0) -> None:
        super().consolidate_state_dict(to)
        self._holds_consolidated_state = self.rank == to

    def state_dict(self) -> dict:
        if not self._holds_consolidated_state:
            return {"local_shard": self.optim.state_dict()}
        state = super().state_dict()
        self._holds_consolidated_state = False  # consolidated copies go stale after the next update
        release_consolidated_copies(self)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if "local_shard" in state_dict:
            self.optim.load_state_dict(state_dict["local_shard"])
            return
        # The whole state, from a checkpoint of any number of processes. The base class checks that its groups
        # match these parameters and takes their hyper-parameters (learning rates...), holding no state itself;
        # this process's optimizer takes the state of its share through its own `load_state_dict`, which puts
        # each tensor where that optimizer keeps it: e.g. float moments cast to the parameter's dtype and device,
        # Adam's `step` left as saved, or on the parameter's device for fused or capturable Adam, host memory
        # for a HostOffloadedOptimizer. (ZeroRedundancyOptimizer's own loading assigns the shard's state
        # directly, keyed by the model's parameters and with every 0-dim tensor moved to the CPU: wrong for
        # fused or capturable Adam on a GPU, which needs `step` on the parameter's device, and for a
        # HostOffloadedOptimizer, which keys its state by its host parameters.) The CPU tests compare what
        # the shard loads with what the same optimizer loads unsharded; on a GPU the same calls run with
        # the parameters on the GPU.
        torch.optim.Optimizer.load_state_dict(self, {**state_dict, "state": {}})
        self.optim.load_state_dict(self._local_state_dict(state_dict))

    def _local_state_dict(self, state_dict: dict) -> dict:
        """The part of a whole optimizer state that this process's optimizer holds, in that optimizer's numbering."""
        # The whole state lists its parameter ids group by group in the order of this optimizer's parameters
        # (the base class's `load_state_dict` checked the group sizes).
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        saved_id_of = {id(param): index for param, index in zip(params, saved_ids, strict=True)}
        local_params = iter(model_parameters(self.optim))
        groups, state = [], {}
        # One local group per group of the whole (possibly empty), as ZeroRedundancyOptimizer partitions them.
        local_groups = self.optim.state_dict()["param_groups"]
        for saved_group, local_group in zip(state_dict["param_groups"], local_groups, strict=True):
            group = {key: value for key, value in saved_group.items() if key not in ("params", "param_names")}
            group["params"] = local_group["params"]
            if "param_names" in local_group:
                group["param_names"] = local_group["param_names"]
            groups.append(group)
            for local_id in local_group["params"]:
                saved_id = saved_id_of[id(next(local_params))]
                if saved_id in state_dict["state"]:
                    state[local_id] = state_dict["state"][saved_id]
        return {"state": state, "param_groups": groups}


def find_wrapped_optimizer(optimizer: torch.optim.Optimizer, classes: tuple[type, ...]) -> Any:
    """The first optimizer of one of `classes` inside `optimizer`'s wrappers (e.g. accelerate's), or None."""
    while not isinstance(optimizer, classes) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer if isinstance(optimizer, classes) else None


def prepare_optimizer_for_checkpoint(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Get the run's optimizer ready for `optimizer.state_dict()` to be written to a checkpoint by process 0.

    Call it on every process (a sharded optimizer's shards are sent to process 0); `device` is the device the
    model is on. Optimizers that are not sharded need nothing.
    """
    sharded = find_wrapped_optimizer(optimizer, (ShardedOptimizer,))
    if sharded is None:
        return
    sharded.consolidate_state_dict(to=0)
    # ZeroRedundancyOptimizer.consolidate_state_dict copies the shards it receives (and its own) to the CPU with
    # non_blocking=True: from a GPU those copies may still be in flight when it returns, and torch.save would write
    # whatever bytes the host buffers held then. Only process 0 receives copies; waiting everywhere costs the
    # others one synchronization per checkpoint.
    wait_for_device_to_host_copies(device)


def holds_no_tensor_state(optimizer_file: str) -> bool:
    """Whether a saved optimizer state (a torch file; memory-mapped, so only its index is read) has no tensor in
    its per-parameter state: plain SGD's, whose state is its hyper-parameters alone. False for a missing file."""
    if not os.path.isfile(optimizer_file):
        return False
    saved = torch.load(optimizer_file, map_location="cpu", weights_only=True, mmap=True)
    return not any(torch.is_tensor(value) for state in saved.get("state", {}).values() for value in state.values())


def load_hyperparameters(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Take the hyper-parameters (learning rate...) of a saved optimizer state group by group, whatever its
    parameters are called (indices, or an FSDP state's parameter names)."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"the saved optimizer has {len(saved_groups)} parameter groups, this one "
                         f"{len(optimizer.param_groups)}")
    for group, saved in zip(optimizer.param_groups, saved_groups):
        group.update({key: value for key, value in saved.items() if key not in ("params", "param_names")})


# ---- Private upstream touchpoints ------------------------------------------------------------------------
# The only uses of private torch names; each has a test in tests/test_optimizer_state.py that fails when torch
# changes it.


def release_consolidated_copies(optimizer: ZeroRedundancyOptimizer) -> None:
    """Free the copies of every shard that `consolidate_state_dict` left on the process they were sent to.

    ZeroRedundancyOptimizer keeps them until the next consolidation: a stale copy of the other processes' state in
    host memory between checkpoints, which no public method frees.
    """
    optimizer._all_state_dicts = []
