"""`optimum.graphcore.training_args`: the training arguments (ipu_trainer's own)."""

from ipu_trainer.run.training_args import ALLOWED_N_IPU, IPUTrainingArguments

__all__ = ["ALLOWED_N_IPU", "IPUTrainingArguments"]
