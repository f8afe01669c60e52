"""`optimum.graphcore.data`: the masking collator and batch-axis padding (ipu_trainer's own)."""

from ipu_trainer.data.collators import DataCollatorForLanguageModelingWithMaxTokensMasked, pad_on_batch_axis

__all__ = ["DataCollatorForLanguageModelingWithMaxTokensMasked", "pad_on_batch_axis"]
