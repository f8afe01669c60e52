"""Evaluation metrics from predictions reduced per batch: the pretraining losses reported apart add up to the
loss a plain `BertForPreTraining` computes, however the rows are split into evaluation batches."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForPreTraining

from ipu_trainer.training.metrics import pretraining_metrics, pretraining_predictions


def test_pretraining_losses_apart_match_the_models_loss_across_batches():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    model = BertForPreTraining(config).eval()
    input_ids = torch.randint(5, 50, (6, 12))
    labels = torch.full_like(input_ids, -100)
    masked = torch.rand(input_ids.shape) < 0.3
    masked[:, 1] = True  # every row has a label; rows hold different numbers of them
    labels[masked] = input_ids[masked]
    next_sentence_label = torch.tensor([0, 1, 1, 0, 1, 0])
    with torch.no_grad():
        output = model(input_ids=input_ids, labels=labels, next_sentence_label=next_sentence_label)
        logits = model(input_ids=input_ids)
    expected_mlm = torch.nn.functional.cross_entropy(logits.prediction_logits.reshape(-1, 50), labels.reshape(-1))
    expected_nsp = torch.nn.functional.cross_entropy(logits.seq_relationship_logits, next_sentence_label)
    assert (expected_mlm + expected_nsp).item() == pytest.approx(output.loss.item(), rel=1e-5)

    # Two evaluation batches of unequal size, concatenated as the Trainer does.
    parts = [
        pretraining_predictions(
            (logits.prediction_logits[rows], logits.seq_relationship_logits[rows]), (labels[rows], next_sentence_label[rows])
        )
        for rows in (slice(0, 4), slice(4, 6))
    ]
    predictions = [np.concatenate([part[i].numpy() for part in parts]) for i in range(len(parts[0]))]
    metrics = pretraining_metrics(SimpleNamespace(predictions=predictions))
    assert metrics["mlm_loss"] == pytest.approx(expected_mlm.item(), rel=1e-5)
    assert metrics["nsp_loss"] == pytest.approx(expected_nsp.item(), rel=1e-5)
    assert metrics["nsp_accuracy"] == pytest.approx(
        (logits.seq_relationship_logits.argmax(-1) == next_sentence_label).float().mean().item()
    )
