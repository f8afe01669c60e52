"""`optimum.graphcore.data.data_collator`, where optimum-graphcore defined the collators."""

from ipu_trainer.data.collators import DataCollatorForLanguageModelingWithMaxTokensMasked, pad_on_batch_axis

__all__ = ["DataCollatorForLanguageModelingWithMaxTokensMasked", "pad_on_batch_axis"]
