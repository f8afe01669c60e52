"""Evaluation metrics computed from predictions reduced on the device (argmax before gathering), so
evaluation memory does not grow with the vocabulary."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _as_tuple(value: Any) -> tuple:
    return value if isinstance(value, (tuple, list)) else (value,)


def pretraining_predictions(logits: Any, labels: Any) -> tuple[torch.Tensor, ...]:
    """Reduce a pretraining model's eval outputs to (mlm predictions, mlm labels, nsp predictions, nsp labels).

    The outputs are recognised by shape rather than position, so both the masked-positions model
    (logits [B, K, V] plus the gathered `masked_lm_labels` [B, K]) and a plain `BertForPreTraining`
    (logits [B, L, V], labels from the batch) work.
    """
    outputs = [t for t in _as_tuple(logits) if isinstance(t, torch.Tensor)]
    mlm_logits = next(t for t in outputs if t.dim() == 3)
    nsp_logits = next((t for t in outputs if t.dim() == 2 and t.is_floating_point() and t.shape[-1] == 2), None)
    gathered = next((t for t in outputs if t.dim() == 2 and not t.is_floating_point()), None)
    batch_labels = _as_tuple(labels)
    mlm_labels = gathered if gathered is not None else batch_labels[0]
    nsp_labels = batch_labels[1] if len(batch_labels) > 1 and batch_labels[1] is not None else None
    batch = mlm_logits.shape[0]
    if nsp_logits is None or nsp_labels is None:
        nsp_predictions = nsp_labels = torch.full((batch,), -100, device=mlm_logits.device)
    else:
        nsp_predictions = nsp_logits.argmax(dim=-1)
    return mlm_logits.argmax(dim=-1), mlm_labels, nsp_predictions, nsp_labels


def pretraining_metrics(eval_prediction: Any) -> dict[str, float]:
    mlm_predictions, mlm_labels, nsp_predictions, nsp_labels = eval_prediction.predictions
    metrics = {"mlm_accuracy": masked_accuracy(mlm_predictions, mlm_labels)}
    if (np.asarray(nsp_labels) != -100).any():
        metrics["nsp_accuracy"] = masked_accuracy(nsp_predictions, nsp_labels)
    return metrics


def masked_accuracy(predictions: Any, labels: Any) -> float:
    """Accuracy over the positions that carry a label (labels of -100 are ignored)."""
    predictions = np.asarray(predictions).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    counted = labels != -100
    if not counted.any():
        return float("nan")
    return float((predictions[counted] == labels[counted]).mean())
