"""IPU-config driven training of language models on CPUs and GPUs.

The names the IPU example scripts import, as a drop-in: `IPUConfig`, `IPUTrainingArguments`,
`IPUTrainer`, `DataCollatorForLanguageModelingWithMaxTokensMasked`, `pad_on_batch_axis`.
"""

from .data_collators import DataCollatorForLanguageModelingWithMaxTokensMasked, pad_on_batch_axis
from .ipu_config import IncompatibleIPUConfigError, IPUConfig
from .trainer import IPUTrainer
from .training_args import IPUTrainingArguments

__all__ = [
    "DataCollatorForLanguageModelingWithMaxTokensMasked",
    "IncompatibleIPUConfigError",
    "IPUConfig",
    "IPUTrainer",
    "IPUTrainingArguments",
    "pad_on_batch_axis",
]
