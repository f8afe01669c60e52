"""Tiny models and deterministic data shared by the trainer tests and the torchrun worker."""

import torch
from datasets import Dataset
from transformers import BertConfig, BertForPreTraining

VOCAB = 64
SEQ = 16


def tiny_bert(seed: int = 0) -> BertForPreTraining:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForPreTraining(config)


def masked_pairs(n: int, seed: int = 1) -> Dataset:
    """Pre-masked pretraining rows, each unique, so batches are deterministic whatever the order."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (n, SEQ), generator=g)
    input_ids[:, 0] = torch.arange(n) % VOCAB  # row identity
    labels = torch.full((n, SEQ), -100)
    chosen = torch.rand(n, SEQ, generator=g) < 0.3
    chosen[:, 1] = True
    labels[chosen] = input_ids[chosen]
    return Dataset.from_dict({
        "input_ids": input_ids.tolist(),
        "attention_mask": torch.ones(n, SEQ, dtype=torch.long).tolist(),
        "token_type_ids": torch.zeros(n, SEQ, dtype=torch.long).tolist(),
        "labels": labels.tolist(),
        "next_sentence_label": torch.randint(0, 2, (n,), generator=g).tolist(),
    })


def varied_masked_pairs(n: int, seed: int = 2) -> Dataset:
    """Pre-masked pretraining rows of 5 to SEQ tokens, right-padded to SEQ with id 0 (so that packing has
    something to pack), each unique."""
    g = torch.Generator().manual_seed(seed)
    rows = masked_pairs(n, seed).to_dict()
    lengths = torch.randint(5, SEQ + 1, (n,), generator=g).tolist()
    for i, length in enumerate(lengths):
        for column, pad in (("input_ids", 0), ("attention_mask", 0), ("token_type_ids", 0), ("labels", -100)):
            rows[column][i] = rows[column][i][:length] + [pad] * (SEQ - length)
    return Dataset.from_dict(rows)
