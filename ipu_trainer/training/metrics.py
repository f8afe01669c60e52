"""Evaluation metrics computed from predictions reduced on the device (argmax before gathering), so
evaluation memory does not grow with the vocabulary."""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import torch

from ..models.layers import IGNORE_INDEX

logger = logging.getLogger(__name__)


def _as_tuple(value: Any) -> tuple:
    return value if isinstance(value, (tuple, list)) else (value,)


def pretraining_predictions(logits: Any, labels: Any) -> tuple[torch.Tensor, ...]:
    """Reduce a pretraining model's eval outputs to (mlm predictions, mlm labels, nsp predictions, nsp labels,
    mlm loss sums, mlm label counts, nsp loss sums): the last three per row, so the two losses can be reported
    apart (the model's loss is their sum).

    The outputs are recognised by shape rather than position, so both the masked-positions model
    (logits [B, K, V] plus the gathered `masked_lm_labels` [B, K]) and a plain `BertForPreTraining`
    (logits [B, L, V], labels from the batch) work, and packed rows too (NSP logits and labels per sequence
    slot, [B, M, 2] and [B, M]).
    """
    outputs = [t for t in _as_tuple(logits) if isinstance(t, torch.Tensor)]
    # NSP logits end in 2 classes: [B, 2], or [B, M, 2] (one per sequence) for packed rows.
    nsp_logits = next((t for t in outputs if t.dim() in (2, 3) and t.is_floating_point() and t.shape[-1] == 2), None)
    mlm_logits = next(t for t in outputs if t.dim() == 3 and t is not nsp_logits)
    gathered = next((t for t in outputs if t.dim() == 2 and not t.is_floating_point()), None)
    batch_labels = _as_tuple(labels)
    mlm_labels = gathered if gathered is not None else batch_labels[0]
    nsp_labels = batch_labels[1] if len(batch_labels) > 1 and batch_labels[1] is not None else None
    batch = mlm_logits.shape[0]
    mlm_loss_sums = _row_cross_entropy_sums(mlm_logits, mlm_labels)
    mlm_counts = (mlm_labels != IGNORE_INDEX).reshape(batch, -1).sum(dim=1)
    if nsp_logits is None or nsp_labels is None:
        nsp_predictions = nsp_labels = torch.full((batch,), IGNORE_INDEX, device=mlm_logits.device)
        nsp_loss_sums = torch.zeros(batch, device=mlm_logits.device)
    else:
        nsp_predictions = nsp_logits.argmax(dim=-1)
        nsp_loss_sums = _row_cross_entropy_sums(nsp_logits, nsp_labels)
    return mlm_logits.argmax(dim=-1), mlm_labels, nsp_predictions, nsp_labels, mlm_loss_sums, mlm_counts, nsp_loss_sums


def _row_cross_entropy_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row of the batch: the float32 cross-entropy summed over the positions that carry a label."""
    losses = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses.reshape(logits.shape[0], -1).sum(dim=1)


def pretraining_metrics(eval_prediction: Any) -> dict[str, float]:
    """Masked-token and next-sentence accuracy, and the two losses apart (each a mean over its labels)."""
    mlm_predictions, mlm_labels, nsp_predictions, nsp_labels, *loss_parts = eval_prediction.predictions
    metrics = {"mlm_accuracy": masked_accuracy(mlm_predictions, mlm_labels)}
    has_nsp = (np.asarray(nsp_labels) != IGNORE_INDEX).any()
    if has_nsp:
        metrics["nsp_accuracy"] = masked_accuracy(nsp_predictions, nsp_labels)
    if loss_parts:
        mlm_loss_sums, mlm_counts, nsp_loss_sums = (np.asarray(part, dtype=np.float64) for part in loss_parts)
        if mlm_counts.sum() > 0:
            metrics["mlm_loss"] = float(mlm_loss_sums.sum() / mlm_counts.sum())
        if has_nsp:
            metrics["nsp_loss"] = float(nsp_loss_sums.sum() / (np.asarray(nsp_labels) != IGNORE_INDEX).sum())
    return metrics


def masked_accuracy(predictions: Any, labels: Any) -> float:
    """Accuracy over the positions that carry a label (labels of -100 are ignored)."""
    predictions = np.asarray(predictions).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    counted = labels != IGNORE_INDEX
    if not counted.any():
        return float("nan")
    return float((predictions[counted] == labels[counted]).mean())


def masked_lm_predictions(logits: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`preprocess_logits_for_metrics` for masked LMs: (argmax predictions, the labels they align with).

    The masked-position models return logits [B, K, V] at the gathered positions plus the gathered labels
    [B, K]; a plain `AutoModelForMaskedLM` returns logits [B, S, V], scored against the batch labels [B, S].
    Only the [B, K or S] argmax leaves the device, so evaluation memory does not grow with the vocabulary.
    """
    outputs = [t for t in _as_tuple(logits) if isinstance(t, torch.Tensor)]
    mlm_logits = next(t for t in outputs if t.dim() == 3)
    gathered = next((t for t in outputs if t.dim() == 2 and not t.is_floating_point()), None)
    return mlm_logits.argmax(dim=-1), gathered if gathered is not None else _as_tuple(labels)[0]


def causal_lm_predictions(logits: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`preprocess_logits_for_metrics` for causal LMs: the prediction at position t is scored against the
    label at t + 1, so this returns (argmax of logits[:, :-1], labels[:, 1:])."""
    lm_logits = _as_tuple(logits)[0]
    return lm_logits[:, :-1].argmax(dim=-1), _as_tuple(labels)[0][:, 1:]


class AccuracyMetric:
    """Token accuracy over labelled positions, through `evaluate`'s "accuracy" metric when it loads.

    `evaluate.load("accuracy")` needs the metric script from the hub; offline it fails (FileNotFoundError
    after a second or two), so the first failure switches to the identical local computation
    (`masked_accuracy`) for the rest of the run. Construct it once per run, not once per evaluation.
    """

    def __init__(self, cache_dir: str | None = None) -> None:
        try:
            import evaluate  # imported here: it is slow to import and only needed when evaluating

            self._metric = evaluate.load("accuracy", cache_dir=cache_dir)
            self.source = "evaluate"
        except Exception as error:  # offline, no script, or evaluate missing: same number computed locally
            logger.info("evaluate's accuracy metric is not available (%s); computing accuracy locally.", error)
            self._metric = None
            self.source = "local"

    def __call__(self, predictions: Any, labels: Any) -> float:
        if self._metric is None:
            return masked_accuracy(predictions, labels)
        predictions = np.asarray(predictions).reshape(-1)
        labels = np.asarray(labels).reshape(-1)
        counted = labels != IGNORE_INDEX
        if not counted.any():
            return float("nan")
        return float(self._metric.compute(predictions=predictions[counted], references=labels[counted])["accuracy"])


def token_accuracy_metrics(accuracy: Callable[[Any, Any], float]) -> Callable[[Any], dict[str, float]]:
    """`compute_metrics` for predictions reduced by `masked_lm_predictions` / `causal_lm_predictions`:
    {"accuracy": accuracy over the positions whose label is not -100}."""

    def compute_metrics(eval_prediction: Any) -> dict[str, float]:
        predictions, labels = eval_prediction.predictions
        return {"accuracy": accuracy(predictions, labels)}

    return compute_metrics
