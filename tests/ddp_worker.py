"""A training run for the multi-process tests, started with `python -m torch.distributed.run`.

Trains the tiny BERT with IPUTrainer and writes, per process, the rows it trained on in each step and
the bytes of optimizer state it holds; process 0 also saves the model.
"""

import argparse
import json
import os
import sys

import torch
from transformers import default_data_collator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny import masked_pairs, tiny_bert  # noqa: E402

from ipu_trainer import IPUConfig, IPUTrainer, IPUTrainingArguments  # noqa: E402


class RecordingTrainer(IPUTrainer):
    crash_at_step = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows_per_step = []

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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--sharding", action="store_true")
    parser.add_argument("--lamb", action="store_true")
    parser.add_argument("--crash_at_step", type=int)
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()

    ipu_config = IPUConfig(layers_per_ipu=[-1], replication_factor=options.replicas,
                           gradient_accumulation_steps=options.accumulation,
                           replicated_tensor_sharding=options.sharding)
    args = training_args(options.output_dir, options.steps, options.save_steps, lamb=options.lamb)
    RecordingTrainer.crash_at_step = options.crash_at_step
    trainer = RecordingTrainer(model=tiny_bert(), ipu_config=ipu_config, args=args,
                               data_collator=default_data_collator, train_dataset=masked_pairs(64))
    trainer.train(resume_from_checkpoint=True if options.resume else None)
    trainer.save_model()
    report = {"rows_per_step": trainer.rows_per_step, "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
              "world_size": args.world_size}
    with open(os.path.join(options.output_dir, f"rank{args.process_index}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
