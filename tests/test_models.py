import json
import logging
import math
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForPreTraining, BertConfig, BertForPreTraining, GPT2Config

from conftest import loss_and_grads
from ipu_trainer.data.collators import DataCollatorForLanguageModelingWithMaxTokensMasked, max_num_masked_tokens
from ipu_trainer.models import (
    BertForPreTrainingMaskedPositions,
    ChunkedVocabProjection,
    masked_positions_model_for,
)


SEQ_LEN = 64
BATCH = 8


def tiny_config(**overrides):
    values = dict(
        vocab_size=2000,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=SEQ_LEN,
        # no dropout, so two models on the same weights compute the same thing in train mode
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_num_masked_tokens=max_num_masked_tokens(SEQ_LEN, 0.15),
    )
    values.update(overrides)
    return BertConfig(**values)


@pytest.fixture(scope="module")
def batch(tokenizer, english_documents):
    """A sentence-pair pretraining batch masked by our collator, so no row exceeds the cap."""
    examples = []
    for i in range(BATCH):
        encoded = tokenizer(
            english_documents[2 * i], english_documents[2 * i + 1], truncation=True, max_length=SEQ_LEN,
            padding="max_length",
        )
        examples.append(dict(encoded, next_sentence_label=i % 2))
    collator = DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, mlm_probability=0.15, seed=0)
    result = collator(examples)
    assert (result["labels"] != -100).sum(dim=1).max() <= tiny_config().max_num_masked_tokens
    return result


def paired_models(**config_overrides):
    torch.manual_seed(0)
    ours = BertForPreTrainingMaskedPositions(tiny_config(**config_overrides))
    reference = BertForPreTraining(tiny_config(**config_overrides))
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def assert_same_loss_and_grads(ours, reference, batch, rtol=1e-5, grad_rtol=1e-4):
    loss, grads = loss_and_grads(ours, batch)
    ref_loss, ref_grads = loss_and_grads(reference, batch)
    assert math.isclose(loss.item(), ref_loss.item(), rel_tol=rtol)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=grad_rtol, atol=1e-7, msg=name)


@pytest.mark.parametrize("static", [False, True], ids=["packed", "static-k"])
def test_loss_and_gradients_match_bert_for_pretraining(batch, static):
    # CPU training packs the labelled positions; static_masked_positions gathers K per row as accelerators do.
    ours, reference = paired_models()
    ours.static_masked_positions = static
    assert_same_loss_and_grads(ours, reference, batch)


def test_full_sequence_fallback_without_max_num_masked_tokens(batch):
    ours, reference = paired_models(max_num_masked_tokens=None)
    assert_same_loss_and_grads(ours, reference, batch)
    ours.eval()
    assert ours(**batch).prediction_logits.shape == (BATCH, SEQ_LEN, 2000)


def test_training_returns_only_the_loss(batch):
    model, _ = paired_models()
    model.train()
    output = model(**batch)
    assert output.loss is not None and output.loss.requires_grad
    assert output.prediction_logits is None and output.seq_relationship_logits is None
    assert output.masked_lm_labels is None


def test_eval_outputs_at_masked_positions(batch):
    ours, reference = paired_models()
    ours.eval()
    reference.eval()
    k = ours.config.max_num_masked_tokens
    with torch.no_grad():
        output = ours(**batch)
        ref = reference(**batch)
    assert output.prediction_logits.shape == (BATCH, k, 2000)
    assert output.masked_lm_labels.shape == (BATCH, k)
    assert output.seq_relationship_logits.shape == (BATCH, 2)
    torch.testing.assert_close(output.loss, output.mlm_loss + output.nsp_loss)
    torch.testing.assert_close(output.loss, ref.loss, rtol=1e-5, atol=0)
    # the gathered labels are exactly the labelled tokens of each row, aligned with their logits
    labels = batch["labels"]
    for row in range(BATCH):
        gathered = output.masked_lm_labels[row]
        assert sorted(gathered[gathered != -100].tolist()) == sorted(labels[row][labels[row] != -100].tolist())
    selected = output.masked_lm_labels != -100
    full_logits_at_labels = ref.prediction_logits[labels != -100]
    torch.testing.assert_close(
        output.prediction_logits[selected].sort(dim=0).values, full_logits_at_labels.sort(dim=0).values
    )
    # return_dict=False gives the upstream-style tuple
    with torch.no_grad():
        as_tuple = ours(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], output.loss)


def test_rows_over_the_cap_warn_once(batch, caplog):
    model, _ = paired_models(max_num_masked_tokens=4)
    model.eval()
    with caplog.at_level(logging.WARNING, logger="ipu_trainer.models.masked_positions"):
        with torch.no_grad():
            model(**batch)
            model(**batch)
    assert len([r for r in caplog.records if "max_num_masked_tokens=4" in r.getMessage()]) == 1


def test_sdpa_attention_and_registry():
    model = BertForPreTrainingMaskedPositions(tiny_config())
    assert model.config._attn_implementation == "sdpa"
    assert masked_positions_model_for(tiny_config()) is BertForPreTrainingMaskedPositions
    assert masked_positions_model_for(GPT2Config()) is None


def saved_logits_numel(model, batch):
    """Total size of the [..., vocab] activations autograd keeps for backward (outside recomputation)."""
    sizes = []

    def pack(tensor):
        if tensor.dim() >= 2 and tensor.shape[-1] == model.config.vocab_size:
            sizes.append(tensor.numel())
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch).loss.backward()
    return sum(sizes)


def test_chunked_projection_matches_and_stays_tied(batch):
    ours, reference = paired_models()
    # The static-K gather: B x K rows go through the projection whatever number of labels the batch has (CPU
    # training would otherwise pack just the labelled positions, whose count depends on the masking draw).
    ours.static_masked_positions = True
    keys = list(ours.state_dict().keys())
    ipu_config = SimpleNamespace(embedding_serialization_factor=4, projection_serialization_factor=None)
    full_logits_numel = BATCH * ours.config.max_num_masked_tokens * 2000
    assert saved_logits_numel(ours, batch) >= full_logits_numel

    assert ours.parallelize(ipu_config) is ours
    decoder = ours.cls.predictions.decoder
    assert isinstance(decoder, ChunkedVocabProjection) and decoder.num_chunks == 4
    assert decoder.weight.data_ptr() == ours.bert.embeddings.word_embeddings.weight.data_ptr()
    assert decoder.bias is ours.cls.predictions.bias
    assert list(ours.state_dict().keys()) == keys
    assert_same_loss_and_grads(ours, reference, batch, grad_rtol=1e-5)
    # the logits are recomputed chunk by chunk in backward instead of being kept
    assert saved_logits_numel(ours, batch) < full_logits_numel / 4

    # eval still returns logits through the chunked module
    ours.eval()
    with torch.no_grad():
        assert ours(**batch).prediction_logits.shape == (BATCH, ours.config.max_num_masked_tokens, 2000)

    assert ours.deparallelize() is ours
    decoder = ours.cls.predictions.decoder
    assert type(decoder) is nn.Linear
    assert decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert decoder.bias is ours.cls.predictions.bias
    assert list(ours.state_dict().keys()) == keys


def test_projection_serialization_factor_also_chunks():
    model = BertForPreTrainingMaskedPositions(tiny_config())
    model.parallelize(SimpleNamespace(embedding_serialization_factor=1, projection_serialization_factor=3))
    assert model.cls.predictions.decoder.num_chunks == 3
    model.parallelize(SimpleNamespace())  # factors absent -> back to a plain Linear
    assert type(model.cls.predictions.decoder) is nn.Linear


def test_recompute_per_layer_toggles_and_keeps_results(batch):
    ours, reference = paired_models()
    ours.parallelize(SimpleNamespace(recompute_checkpoint_every_layer=True))
    assert ours.is_gradient_checkpointing
    assert all(layer.gradient_checkpointing for layer in ours.bert.encoder.layer)
    assert_same_loss_and_grads(ours, reference, batch)
    ours.deparallelize()
    assert not ours.is_gradient_checkpointing


def test_saved_checkpoint_is_plain_bert_for_pretraining(batch, tmp_path):
    model = BertForPreTrainingMaskedPositions(tiny_config())
    model.parallelize(SimpleNamespace(embedding_serialization_factor=2, recompute_checkpoint_every_layer=True))
    model.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "config.json")) as f:
        assert json.load(f)["architectures"] == ["BertForPreTraining"]

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "next_sentence_label")}
    model.deparallelize().eval()
    with torch.no_grad():
        expected = model(**inputs)
    for cls in (BertForPreTraining, AutoModelForPreTraining):
        loaded, info = cls.from_pretrained(tmp_path, output_loading_info=True)
        assert type(loaded) is BertForPreTraining
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        assert not info.get("error_msgs")
        assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
        loaded.eval()
        with torch.no_grad():
            actual = loaded(**inputs)
        torch.testing.assert_close(actual.prediction_logits, expected.prediction_logits, rtol=0, atol=0)
        torch.testing.assert_close(actual.seq_relationship_logits, expected.seq_relationship_logits, rtol=0, atol=0)

    reloaded = BertForPreTrainingMaskedPositions.from_pretrained(tmp_path)
    assert reloaded.config.max_num_masked_tokens == model.config.max_num_masked_tokens
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_from_pretrained_keeps_loaded_weights(tmp_path):
    source = BertForPreTraining(tiny_config())
    with torch.no_grad():
        # far outside what a fresh init could produce
        source.bert.encoder.layer[0].intermediate.dense.weight.fill_(0.5)
        source.cls.seq_relationship.bias.fill_(0.25)
    source.save_pretrained(tmp_path)
    loaded = BertForPreTrainingMaskedPositions.from_pretrained(tmp_path)
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
