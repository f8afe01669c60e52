"""`optimum.graphcore.trainer`: the trainer (ipu_trainer's own)."""

from transformers import TrainerState

from ipu_trainer.training.trainer import IPUTrainer

# optimum-graphcore's trainer state class; upstream's TrainerState serves here.
IPUTrainerState = TrainerState

__all__ = ["IPUTrainer", "IPUTrainerState"]
