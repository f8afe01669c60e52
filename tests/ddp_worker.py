"""A training run for the multi-process tests, started with `python -m torch.distributed.run`.

Trains the tiny BERT with IPUTrainer and writes, per process, the rows it trained on in each step, the
bytes of optimizer state it holds and the throughput meter's last window; process 0 also saves the model.

With --device_matrix it runs the 2-process cases of DEVICE_MATRIX (tests/test_device_matrix.py runs the
1-process ones in-process through `run_device_case`) and writes one report per case and process; with --on_gpu
as well, for real on two CUDA GPUs (NCCL) instead of modelled on the CPU.

With --resume_matrix it checks resuming instead: for every optimizer-state layout and optimizer, a run
of 4 steps that checkpoints every 2, then, in the same processes, a fresh run resumed from its
checkpoint-2 (each in `<layout>-<optimizer>/straight` and `.../resumed`). With --checkpoints_from it
resumes the sharded runs of an earlier matrix (started with another number of processes) instead.

Each process writes its report after `end_distributed()`, with the gloo threads still alive then. With
--late_collective_at_exit it forces the race at exit that `end_distributed()` closes, instead of training.
"""

import atexit
import time


def hold_the_gil_at_exit() -> None:
    """--late_collective_at_exit: registered before any import registers its own, so it runs last of the exit
    handlers, just before interpreter shutdown: Python runs here without letting go of the GIL (see
    late_collective_at_exit) until well after the late collective ended."""
    if LATE_COLLECTIVE_STARTED:
        while time.monotonic() < LATE_COLLECTIVE_STARTED[0] + 4:
            pass


LATE_COLLECTIVE_STARTED = []
atexit.register(hold_the_gil_at_exit)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from transformers import default_data_collator  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import gloo_threads  # noqa: E402
from tiny import SEQ, masked_pairs, tiny_bert, varied_masked_pairs  # noqa: E402

from ipu_trainer import IPUConfig, IPUTrainer, IPUTrainingArguments  # noqa: E402
from ipu_trainer.cli.startup import end_distributed  # noqa: E402
from ipu_trainer.data.packing import PackedDataset, pack_for_training  # noqa: E402
from ipu_trainer.run.device_model import device_model_named  # noqa: E402
from ipu_trainer.run.resolved_run import resolve_run  # noqa: E402
from ipu_trainer.models import BertForPreTrainingMaskedPositions  # noqa: E402
from ipu_trainer.training.optimizer_state import HostOffloadedOptimizer, ShardedOptimizer  # noqa: E402

LAYOUTS = {"sharding": (True, False), "offload": (False, True), "sharding+offload": (True, True)}  # (sharding, offload)
OPTIMIZERS = ("adamw", "lamb")


class RecordingTrainer(IPUTrainer):
    def __init__(self, *args, crash_at_step=None, force_offload=False, **kwargs):
        self.crash_at_step = crash_at_step
        self.force_offload = force_offload
        self.rows_per_step = []
        super().__init__(*args, **kwargs)

    def _offloads_optimizer_state(self, args):
        # Host offload is only chosen on a GPU; forced here so that its checkpoints and resumes run on the CPU.
        return self.force_offload or super()._offloads_optimizer_state(args)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == self.crash_at_step:
            raise SystemExit(3)
        self.rows_per_step.append(inputs["input_ids"][:, 0].tolist())
        return super().training_step(model, inputs, num_items_in_batch)


def optimizer_state_bytes(optimizer) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)
    local = getattr(inner, "optim", inner)  # ZeroRedundancyOptimizer keeps its shard's optimizer in .optim
    return sum(t.numel() * t.element_size() for state in local.state.values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0)


def training_args(output_dir: str, steps: int, save_steps: int, **extra) -> IPUTrainingArguments:
    return IPUTrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=2, learning_rate=1e-3, weight_decay=0.01,
        lr_scheduler_type="linear", max_steps=steps, fp32=True, report_to=[], logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, seed=0, disable_tqdm=True,
        **extra,
    )


def train(output_dir, options, sharding, offload, lamb, resume=None, crash_at_step=None) -> RecordingTrainer:
    ipu_config = IPUConfig(layers_per_ipu=[-1], replication_factor=options.replicas,
                           gradient_accumulation_steps=options.accumulation,
                           replicated_tensor_sharding=sharding, optimizer_state_offchip=offload)
    args = training_args(output_dir, options.steps, options.save_steps, lamb=lamb)
    trainer = RecordingTrainer(model=tiny_bert(), ipu_config=ipu_config, args=args, crash_at_step=crash_at_step,
                               force_offload=offload, data_collator=default_data_collator,
                               train_dataset=masked_pairs(64))
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    return trainer


def resume_matrix(options) -> None:
    for layout, (sharding, offload) in LAYOUTS.items():
        for optimizer in OPTIMIZERS:
            run = os.path.join(options.output_dir, f"{layout}-{optimizer}")
            straight = os.path.join(options.checkpoints_from or options.output_dir, f"{layout}-{optimizer}", "straight")
            if options.checkpoints_from is None:
                train(straight, options, sharding, offload, optimizer == "lamb")
            elif not sharding:
                continue
            checkpoint = os.path.join(straight, "checkpoint-2")
            train(os.path.join(run, "resumed"), options, sharding, offload, optimizer == "lamb", resume=checkpoint)


# ---- --device_matrix: GPU configurations modelled on the CPU (--device_model) -------------------------------------

# A pairwise covering subset of {V100, A100, H100} x {1, 2 processes} x optimizer_state_offchip x
# replicated_tensor_sharding x --packing x {static, dynamic loss scale} (the loss scale only where the GPU trains in
# float16, the V100): every pair of values of any two settings is in some case (tests/test_device_matrix.py checks
# it). "resume": the case also resumes from its checkpoint-2 and must reach the uninterrupted run's weights.
DEVICE_MATRIX = (
    dict(gpu="V100", processes=1, offload=True, sharding=False, packing=False, loss="static", resume=True),
    dict(gpu="V100", processes=2, offload=False, sharding=True, packing=True, loss="static", resume=False),
    dict(gpu="V100", processes=1, offload=False, sharding=True, packing=False, loss="dynamic", resume=False),
    dict(gpu="V100", processes=2, offload=True, sharding=False, packing=True, loss="dynamic", resume=True),
    dict(gpu="A100", processes=1, offload=True, sharding=True, packing=True, loss=None, resume=False),
    dict(gpu="A100", processes=2, offload=False, sharding=False, packing=False, loss=None, resume=False),
    dict(gpu="H100", processes=1, offload=False, sharding=False, packing=True, loss=None, resume=False),
    dict(gpu="H100", processes=2, offload=True, sharding=True, packing=False, loss=None, resume=True),
)
DEVICE_MATRIX_STEPS = 4
LOSS_SCALE = 1024.0  # no float16 overflow for the tiny BERT: every update is applied


def device_case_name(case: dict) -> str:
    settings = [case["gpu"], f"{case['processes']}proc", "offload" if case["offload"] else "no-offload",
                "sharding" if case["sharding"] else "no-sharding", "packing" if case["packing"] else "padded"]
    return "-".join(settings + ([case["loss"]] if case["loss"] else []))


def optimizer_chain(optimizer) -> list:
    """The optimizers inside accelerate's wrapper, outermost first (ZeRO's own is `.optim`)."""
    chain = []
    while optimizer is not None:
        chain.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "optim", None)
    return chain


def run_device_case(case: dict, output_dir: str, resume: str = None, on_gpu: bool = False) -> dict:
    """Train the case's tiny BERT (the package's masked-position pretraining model) for DEVICE_MATRIX_STEPS steps on
    the CPU, modelling the case's GPU; checkpoint-2 is saved for cases that resume. Returns what the test checks.

    on_gpu: run the case for real on this machine's CUDA GPU instead, in the precision the case's GPU would pick
    (--fp16 for a GPU without native bfloat16, else --bf16), everything else as modelled (bench/gpu_check.sh)."""
    float16 = not device_model_named(case["gpu"]).native_bfloat16
    where = dict(fp16=float16, bf16=not float16) if on_gpu else dict(device_model=case["gpu"])
    ipu_config = IPUConfig(layers_per_ipu=[-1], replication_factor=2, gradient_accumulation_steps=1,
                           optimizer_state_offchip=case["offload"], replicated_tensor_sharding=case["sharding"])
    args = IPUTrainingArguments(
        output_dir=output_dir, **where, per_device_train_batch_size=2, learning_rate=1e-3,
        weight_decay=0.01, lr_scheduler_type="linear", max_steps=DEVICE_MATRIX_STEPS, report_to=[], logging_steps=1,
        save_strategy="steps" if case["resume"] else "no", save_steps=2, seed=0, disable_tqdm=True,
        loss_scaling=LOSS_SCALE, auto_loss_scaling=case["loss"] == "dynamic",
    )
    model = BertForPreTrainingMaskedPositions(tiny_bert().config)
    model.config.max_num_masked_tokens = SEQ
    run = resolve_run(ipu_config, args, model.config)
    data, collator = varied_masked_pairs(48), default_data_collator
    if case["packing"]:
        data, _, collator = pack_for_training(data, None, SEQ, 0, masking=None, max_num_masked_tokens=SEQ, seed=0,
                                              placement=run.train_placement)
    trainer = IPUTrainer(model=model, args=args, run=run, data_collator=collator, train_dataset=data)
    trainer.create_optimizer()
    updates = []
    optimizer_chain(trainer.optimizer)[0].register_step_post_hook(lambda *_: updates.append(1))
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    scaler = trainer.accelerator.scaler
    chain = optimizer_chain(trainer.optimizer)
    return {
        "case": device_case_name(case), "rank": trainer.args.process_index, "world_size": trainer.args.world_size,
        "device": str(trainer.args.device), "precision": trainer.run.precision.mixed_precision,
        "autocast": trainer.accelerator.native_amp, "scaler": type(scaler).__name__ if scaler else None,
        "scale": scaler.get_scale() if scaler else None, "global_step": trainer.state.global_step,
        "updates": len(updates), "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "offloaded": any(isinstance(o, HostOffloadedOptimizer) for o in chain),
        "sharded": any(isinstance(o, ShardedOptimizer) for o in chain),
        "packed": isinstance(trainer.train_dataset, PackedDataset),
        "log": [entry for entry in trainer.state.log_history if "loss" in entry],
    }


def device_matrix(options) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if options.on_gpu:  # resumed and uninterrupted runs compared: deterministic kernels (CUBLAS_WORKSPACE_CONFIG set)
        torch.use_deterministic_algorithms(True, warn_only=True)
    for case in DEVICE_MATRIX:
        if case["processes"] != world_size:
            continue
        run = os.path.join(options.output_dir, device_case_name(case))
        reports = [run_device_case(case, os.path.join(run, "straight"), on_gpu=options.on_gpu)]
        if case["resume"]:
            resumed = run_device_case(case, os.path.join(run, "resumed"), on_gpu=options.on_gpu,
                                      resume=os.path.join(run, "straight", f"checkpoint-{DEVICE_MATRIX_STEPS // 2}"))
            reports.append(resumed)
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, f"rank{reports[0]['rank']}.json"), "w") as f:
            json.dump(reports, f)


def main() -> tuple[str, dict] | None:
    """The run the options ask for; for a plain training run, the folder and the report to write there."""
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--sharding", action="store_true")
    parser.add_argument("--offload", action="store_true", help="optimizer state in host memory, as on a GPU")
    parser.add_argument("--lamb", action="store_true")
    parser.add_argument("--crash_at_step", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--rank1_newest", help="with --resume: the newest checkpoint process 1 would find itself")
    parser.add_argument("--resume_matrix", action="store_true", help="4 steps, checkpoints every 2, then a resume")
    parser.add_argument("--checkpoints_from", help="with --resume_matrix: resume this matrix's sharded runs")
    parser.add_argument("--late_collective_at_exit", action="store_true", help="force the race at exit, no training")
    parser.add_argument("--device_matrix", action="store_true", help="the DEVICE_MATRIX cases of this process count")
    parser.add_argument("--on_gpu", action="store_true", help="with --device_matrix: run the cases on CUDA GPUs")
    options = parser.parse_args()

    if options.late_collective_at_exit:
        late_collective_at_exit()
        return None
    if options.device_matrix:
        device_matrix(options)
        return None
    if options.resume_matrix:
        options.steps, options.save_steps = 4, 2
        resume_matrix(options)
        return None
    if options.rank1_newest and os.environ.get("RANK") == "1":
        # As if process 1 ran on a machine whose own output folder held another newest checkpoint.
        import ipu_trainer.training.trainer as trainer_module

        trainer_module.last_resumable_checkpoint = lambda *args, **kwargs: (options.rank1_newest, [])
    trainer = train(options.output_dir, options, options.sharding, options.offload, options.lamb,
                    resume=True if options.resume else None, crash_at_step=options.crash_at_step)
    report = {"rows_per_step": trainer.rows_per_step, "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
              "world_size": trainer.args.world_size, "process_index": trainer.args.process_index,
              "throughput_window": dataclasses.asdict(trainer.throughput.last_window)}
    return options.output_dir, report


def late_collective_at_exit() -> None:
    """The end of a run with the race at exit forced. Process 1 starts a collective and lets go of its tensor at
    once; process 0 joins it 2 s later, so process 1's gloo thread, not Python, drops the tensor last, and needs
    the GIL for it. Process 1 meanwhile ends as a run does, then holds the GIL in its last exit handler (a 100 s
    switch interval: no thread asks for it back) until after the collective ended: the gloo thread, waiting for
    the GIL, gets it only once interpreter shutdown has begun and frees the group's reference cycle (as a trainer's
    DDP reducer holds the group), unless end_distributed() joined it before."""
    torch.distributed.init_process_group("gloo")
    run = {"group": torch.distributed.group.WORLD, "weights": [torch.zeros(8) for _ in range(64)]}
    run["self"] = run
    sys.setswitchinterval(100.0)
    LATE_COLLECTIVE_STARTED.append(time.monotonic())
    if torch.distributed.get_rank() == 0:
        time.sleep(2)
        torch.distributed.all_reduce(torch.ones(8))
    else:
        tensor = torch.ones(8)
        torch.distributed.all_reduce(tensor, async_op=True)
        del tensor
    del run


if __name__ == "__main__":
    try:
        written = main()
    finally:
        end_distributed()  # as the scripts' run_cli does: no process-group threads left to interpreter shutdown
    if written is not None:
        output_dir, report = written
        report["gloo_threads_after_end_distributed"] = gloo_threads()
        with open(os.path.join(output_dir, f"rank{report['process_index']}.json"), "w") as f:
            json.dump(report, f)
