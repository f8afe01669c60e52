"""IPU-config driven training of language models on CPUs and GPUs.

The names the IPU example scripts import, as a drop-in: `IPUConfig`, `IPUTrainingArguments`,
`IPUTrainer`, `DataCollatorForLanguageModelingWithMaxTokensMasked`, `pad_on_batch_axis`.
"""

from .config.ipu_config import IncompatibleIPUConfigError, IPUConfig
from .data.collators import DataCollatorForLanguageModelingWithMaxTokensMasked, pad_on_batch_axis
from .run.training_args import IPUTrainingArguments
from .training.trainer import IPUTrainer

__all__ = [
    "DataCollatorForLanguageModelingWithMaxTokensMasked",
    "IncompatibleIPUConfigError",
    "IPUConfig",
    "IPUTrainer",
    "IPUTrainingArguments",
    "pad_on_batch_axis",
]
