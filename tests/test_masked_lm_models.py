"""Masked-LM and causal-LM building blocks of run_mlm.py / run_clm.py: the masked-position MLM heads, the
chunked GPT-2 head, eval metrics, text preprocessing and sequence-length rules."""

import logging
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import script_module
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForMaskedLM,
)

from ipu_trainer import IncompatibleIPUConfigError, IPUConfig
from ipu_trainer.cli.model_loading import max_positions_of
from ipu_trainer.data.collators import DataCollatorForLanguageModelingWithMaxTokensMasked, max_num_masked_tokens
from ipu_trainer.models import (
    BertForMaskedLMMaskedPositions,
    BertForPreTrainingMaskedPositions,
    ChunkedVocabProjection,
    GPT2LMHeadModelChunked,
    RobertaForMaskedLMMaskedPositions,
    causal_lm_model_for,
    masked_lm_model_for,
)
from ipu_trainer.models import masked_positions
from ipu_trainer.models.layers import set_recomputation
from ipu_trainer.models.masked_positions import OVERFLOW_CHECK_INTERVAL, LabelOverflowCheck
from ipu_trainer.run.resolved_run import check_layers_fit
from ipu_trainer.training import metrics as metrics_module
from ipu_trainer.training.metrics import (
    AccuracyMetric,
    causal_lm_predictions,
    masked_accuracy,
    masked_lm_predictions,
    token_accuracy_metrics,
)

SEQ = 32
BATCH = 6
CHUNKED = SimpleNamespace(recompute_checkpoint_every_layer=True, embedding_serialization_factor=3)


def bert_config(**extra):
    return BertConfig(
        vocab_size=2000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra,
    )


def roberta_config(**extra):
    return RobertaConfig(
        vocab_size=2000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ + 2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra,
    )


MLM_CASES = [
    pytest.param(BertForMaskedLMMaskedPositions, BertForMaskedLM, bert_config, id="bert"),
    pytest.param(RobertaForMaskedLMMaskedPositions, RobertaForMaskedLM, roberta_config, id="roberta"),
]


@pytest.fixture(scope="module")
def mlm_batch(tokenizer, english_documents):
    examples = [tokenizer(doc, truncation=True, max_length=SEQ, padding="max_length") for doc in english_documents[:BATCH]]
    collator = DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, mlm_probability=0.15, seed=0)
    return collator(examples)


def paired(ours_class, upstream_class, make_config):
    config = make_config(max_num_masked_tokens=max_num_masked_tokens(SEQ, 0.15))
    torch.manual_seed(0)
    reference = upstream_class(make_config())
    ours = ours_class(config)
    ours.load_state_dict(reference.state_dict())
    return ours, reference


# ---- masked-position MLM heads ---------------------------------------------------------------------------


@pytest.mark.parametrize("static", [False, True], ids=["packed", "static-k"])
@pytest.mark.parametrize("ours_class, upstream_class, make_config", MLM_CASES)
def test_masked_position_head_gives_the_upstream_loss_and_gradients(ours_class, upstream_class, make_config, mlm_batch, static):
    # CPU training packs the labelled positions; static_masked_positions gathers K per row as accelerators do.
    ours, reference = paired(ours_class, upstream_class, make_config)
    ours.static_masked_positions = static
    assert set(ours.state_dict()) == set(reference.state_dict())
    ours.train(), reference.train()
    out = ours(**mlm_batch)
    expected = reference(**mlm_batch)
    assert out.logits is None  # training returns only the loss
    torch.testing.assert_close(out.loss, expected.loss)
    out.loss.backward(), expected.loss.backward()
    reference_grads = dict(reference.named_parameters())
    for name, parameter in ours.named_parameters():
        torch.testing.assert_close(parameter.grad, reference_grads[name].grad, msg=name)


@pytest.mark.parametrize("ours_class, upstream_class, make_config", MLM_CASES)
def test_eval_returns_logits_only_at_masked_positions_with_their_labels(ours_class, upstream_class, make_config, mlm_batch):
    ours, reference = paired(ours_class, upstream_class, make_config)
    ours.eval(), reference.eval()
    with torch.no_grad():
        out = ours(**mlm_batch)
        full = reference(**mlm_batch)
    k = ours.config.max_num_masked_tokens
    assert out.logits.shape == (BATCH, k, 2000) and out.masked_lm_labels.shape == (BATCH, k)
    torch.testing.assert_close(out.loss, full.loss)
    # The gathered accuracy equals the full-sequence accuracy over labelled positions.
    predictions, labels = masked_lm_predictions((out.logits, out.masked_lm_labels), mlm_batch["labels"])
    full_predictions, full_labels = masked_lm_predictions(full.logits, mlm_batch["labels"])
    assert full_labels is mlm_batch["labels"]
    assert masked_accuracy(predictions, labels) == masked_accuracy(full_predictions, full_labels)
    assert (labels != -100).sum() == (mlm_batch["labels"] != -100).sum()


@pytest.mark.parametrize("ours_class, upstream_class, make_config", MLM_CASES)
def test_parallelize_chunks_the_tied_decoder_and_deparallelize_restores_it(ours_class, upstream_class, make_config, mlm_batch):
    ours, reference = paired(ours_class, upstream_class, make_config)
    ours.train(), reference.train()
    embeddings = ours.get_input_embeddings().weight
    ours.parallelize(CHUNKED)
    decoder = ours.get_output_embeddings()
    assert isinstance(decoder, ChunkedVocabProjection) and decoder.num_chunks == 3
    assert decoder.weight is embeddings  # still tied
    assert ours.is_gradient_checkpointing
    torch.testing.assert_close(ours(**mlm_batch).loss, reference(**mlm_batch).loss)
    ours.deparallelize()
    assert type(ours.get_output_embeddings()) is nn.Linear and ours.get_output_embeddings().weight is embeddings
    assert not ours.is_gradient_checkpointing


@pytest.mark.parametrize("ours_class, upstream_class, make_config", MLM_CASES)
def test_saved_checkpoint_is_a_plain_upstream_masked_lm(ours_class, upstream_class, make_config, mlm_batch, tmp_path):
    ours, _ = paired(ours_class, upstream_class, make_config)
    ours.parallelize(CHUNKED).eval()
    ours.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert type(loaded) is upstream_class
    assert loaded.config.architectures == [upstream_class.__name__]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**mlm_batch).loss, ours(**mlm_batch).loss)


def test_masked_lm_classes_are_picked_by_model_type():
    assert masked_lm_model_for(bert_config()) is BertForMaskedLMMaskedPositions
    assert masked_lm_model_for(roberta_config()) is RobertaForMaskedLMMaskedPositions
    assert masked_lm_model_for(SimpleNamespace(model_type="distilbert")) is None
    assert causal_lm_model_for(GPT2Config()) is GPT2LMHeadModelChunked
    assert causal_lm_model_for(SimpleNamespace(model_type="llama")) is None


# ---- shared by every model: one head, one overflow check, one parallelize ----------------------------------


MASKED_POSITION_CASES = [
    pytest.param(BertForPreTrainingMaskedPositions, bert_config, id="bert-pretraining"),
    pytest.param(BertForMaskedLMMaskedPositions, bert_config, id="bert-mlm"),
    pytest.param(RobertaForMaskedLMMaskedPositions, roberta_config, id="roberta-mlm"),
]


def masked_position_model(model_class, make_config):
    """The smallest model of the family: these tests run hundreds of forwards and look only at the control flow."""
    config = make_config(max_num_masked_tokens=4)
    config.update(dict(vocab_size=100, hidden_size=16, num_hidden_layers=1, intermediate_size=16))
    torch.manual_seed(0)
    return model_class(config)


@pytest.fixture(scope="module")
def small_batch():
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, 100, (2, 8), generator=g)
    labels = torch.full_like(input_ids, -100)
    labels[:, [2, 5]] = input_ids[:, [2, 5]]
    return {"input_ids": input_ids, "labels": labels}


def count_calls(monkeypatch, name, result=None):
    """Replace `masked_positions.<name>` by a wrapper that records each call; returns the list of calls."""
    calls = []
    original = getattr(masked_positions, name)

    def recording(*args):
        calls.append(args)
        return original(*args) if result is None else result

    monkeypatch.setattr(masked_positions, name, recording)
    return calls


@pytest.mark.parametrize("mode", ["eval", "train-static-k"])
@pytest.mark.parametrize("model_class, make_config", MASKED_POSITION_CASES)
def test_overflow_check_has_one_cadence_for_every_model(model_class, make_config, mode, small_batch, monkeypatch):
    # The label count syncs the host on accelerators: first forward, then every OVERFLOW_CHECK_INTERVAL-th.
    model = masked_position_model(model_class, make_config)
    model.train(mode != "eval")
    model.static_masked_positions = True
    calls = count_calls(monkeypatch, "count_overflowing_rows", result=0)
    checked_at = []
    with torch.no_grad():
        for forward in range(250):
            before = len(calls)
            model(**small_batch)
            checked_at += [forward] * (len(calls) - before)
    assert OVERFLOW_CHECK_INTERVAL == 100
    assert checked_at == [0, 100, 200]


@pytest.mark.parametrize("model_class, make_config", MASKED_POSITION_CASES)
def test_overflow_is_warned_once_and_then_never_counted_again(model_class, make_config, small_batch, monkeypatch, caplog):
    model = masked_position_model(model_class, make_config).eval()
    calls = count_calls(monkeypatch, "count_overflowing_rows", result=2)
    with caplog.at_level(logging.WARNING, logger=masked_positions.__name__), torch.no_grad():
        for _ in range(120):
            model(**small_batch)
    assert len(calls) == 1
    assert len([r for r in caplog.records if "2 row(s) carry more than max_num_masked_tokens" in r.getMessage()]) == 1


def test_overflow_check_is_skipped_while_compiling(monkeypatch):
    calls = count_calls(monkeypatch, "count_overflowing_rows", result=0)
    check = LabelOverflowCheck()
    labels = torch.zeros(2, 8, dtype=torch.long)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    check(labels, 4)
    assert calls == [] and check.calls == 0
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    check(labels, 4)
    assert len(calls) == 1


@pytest.mark.parametrize("model_class, make_config", MASKED_POSITION_CASES)
def test_every_model_packs_on_cpu_training_and_gathers_otherwise(model_class, make_config, small_batch, monkeypatch):
    model = masked_position_model(model_class, make_config)
    packed = count_calls(monkeypatch, "pack_labelled_positions")
    gathered = count_calls(monkeypatch, "gather_masked_positions")
    with torch.no_grad():
        model.train()(**small_batch)
        assert (len(packed), len(gathered)) == (1, 0)
        model.eval()(**small_batch)  # eval returns [B, K] logits aligned with the gathered labels
        assert (len(packed), len(gathered)) == (1, 1)
        model.static_masked_positions = True
        model.train()(**small_batch)
        assert (len(packed), len(gathered)) == (1, 2)


PARALLELIZE_CASES = [
    *MASKED_POSITION_CASES,
    pytest.param(GPT2LMHeadModelChunked, lambda: gpt2_config(), id="gpt2"),
]


def recomputing(model):
    # Read from the layers, not through the model property, whose name differs between transformers 5.17 and 5.24.
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


@pytest.mark.parametrize("model_class, make_config", PARALLELIZE_CASES)
def test_parallelize_and_deparallelize_emit_no_deprecation_warnings(model_class, make_config):
    # pyproject ignores FutureWarning for the whole suite, so the warnings are recorded here explicitly.
    model = model_class(make_config())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert model.parallelize(SimpleNamespace()) is model and not recomputing(model)
        assert model.parallelize(CHUNKED) is model and recomputing(model)
        assert isinstance(model.vocab_projection, ChunkedVocabProjection)
        assert model.parallelize(SimpleNamespace(recompute_checkpoint_every_layer=False)) is model
        assert not recomputing(model) and type(model.vocab_projection) is nn.Linear
        model.parallelize(CHUNKED)
        assert model.deparallelize() is model and not recomputing(model)
    deprecations = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecations, [str(w.message) for w in deprecations]


class GradientCheckpointingOnlyModel(nn.Module):
    """The checkpointing API of transformers 5.17, which has no activation_checkpointing_* names."""

    supports_gradient_checkpointing = True

    def __init__(self):
        super().__init__()
        self.calls = []
        self.enabled = False

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.calls.append(("enable", gradient_checkpointing_kwargs))
        self.enabled = True

    def gradient_checkpointing_disable(self):
        self.calls.append(("disable",))
        self.enabled = False

    @property
    def is_gradient_checkpointing(self):
        return self.enabled


def test_recomputation_uses_the_gradient_checkpointing_names_where_they_are_the_only_ones():
    model = GradientCheckpointingOnlyModel()
    set_recomputation(model, False)
    set_recomputation(model, True)
    set_recomputation(model, False)
    assert model.calls == [("enable", {"use_reentrant": False}), ("disable",)]


# ---- GPT-2 -----------------------------------------------------------------------------------------------


def gpt2_config():
    return GPT2Config(
        vocab_size=1000, n_embd=32, n_layer=2, n_head=2, n_positions=SEQ, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


def fixed_causal_batch():
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 1000, (4, SEQ), generator=g)
    labels = input_ids.clone()
    labels[0, 5:9] = -100
    return {"input_ids": input_ids, "labels": labels}


def shifted_cross_entropy(logits, labels):
    """By hand: position t predicts token t + 1, averaged over the targets that are not -100."""
    total, count = 0.0, 0
    for row in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[row, t + 1])
            if target == -100:
                continue
            total += -torch.log_softmax(logits[row, t].double(), dim=-1)[target].item()
            count += 1
    return total / count


def test_gpt2_loss_is_the_shifted_cross_entropy_with_and_without_chunks():
    torch.manual_seed(0)
    model = GPT2LMHeadModelChunked(gpt2_config())
    batch = fixed_causal_batch()
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    expected = shifted_cross_entropy(out.logits, batch["labels"])
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)

    model.train()
    model.parallelize(CHUNKED)
    chunked = model(**batch)
    assert chunked.logits is None
    assert chunked.loss.item() == pytest.approx(expected, rel=1e-5)


def test_gpt2_head_stays_tied_through_parallelize_training_and_saving(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModelChunked(gpt2_config())
    wte = model.transformer.wte.weight
    model.parallelize(CHUNKED).train()
    assert model.lm_head.weight is wte
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**fixed_causal_batch()).loss.backward()
    optimizer.step()
    assert model.lm_head.weight is wte and model.transformer.wte.weight is wte
    model.deparallelize()
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is wte
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is GPT2LMHeadModel and loaded.config.architectures == ["GPT2LMHeadModel"]
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    torch.testing.assert_close(loaded.transformer.wte.weight, wte.detach())


def test_layers_per_ipu_is_checked_against_gpt2_layers():
    model = GPT2LMHeadModel(gpt2_config())  # n_layer=2
    check_layers_fit(IPUConfig(layers_per_ipu=[1, 1], ipus_per_replica=2), model.config)
    with pytest.raises(IncompatibleIPUConfigError, match="3.*2|2.*3"):
        check_layers_fit(IPUConfig(layers_per_ipu=[1, 2], ipus_per_replica=2), model.config)


# ---- metrics ---------------------------------------------------------------------------------------------


def test_causal_predictions_are_scored_against_the_next_token():
    logits = torch.zeros(1, 4, 10)
    for t, token in enumerate([3, 4, 5, 6]):
        logits[0, t, token] = 1.0  # position t predicts `token`
    labels = torch.tensor([[9, 3, 4, -100]])  # targets at t+1: 3 (right), 4 (right), -100 (ignored)
    predictions, shifted = causal_lm_predictions(logits, labels)
    assert predictions.tolist() == [[3, 4, 5]] and shifted.tolist() == [[3, 4, -100]]
    assert masked_accuracy(predictions, shifted) == 1.0
    labels = torch.tensor([[9, 3, 7, 5]])  # 3 right, 7 wrong, 5 right
    assert masked_accuracy(*causal_lm_predictions(logits, labels)) == pytest.approx(2 / 3)


def test_accuracy_counts_only_labelled_positions():
    predictions = np.array([[1, 2, 3, 4]])
    labels = np.array([[1, -100, 9, -100]])
    assert masked_accuracy(predictions, labels) == 0.5
    assert np.isnan(masked_accuracy(predictions, np.full((1, 4), -100)))
    compute = token_accuracy_metrics(masked_accuracy)
    assert compute(SimpleNamespace(predictions=(predictions, labels), label_ids=None)) == {"accuracy": 0.5}


def test_accuracy_falls_back_to_local_computation_once_when_evaluate_cannot_load(monkeypatch):
    import evaluate

    calls = []

    def offline_load(*args, **kwargs):
        calls.append(args)
        raise FileNotFoundError("Couldn't find a module script at accuracy/accuracy.py")

    monkeypatch.setattr(evaluate, "load", offline_load)
    accuracy = AccuracyMetric()
    assert accuracy.source == "local"
    for _ in range(3):
        assert accuracy(np.array([1, 2, 3]), np.array([1, -100, 0])) == 0.5
    assert len(calls) == 1


def test_accuracy_uses_evaluate_when_it_loads(monkeypatch):
    import evaluate

    class FakeAccuracy:
        def compute(self, predictions, references):
            assert -100 not in references
            return {"accuracy": float((np.asarray(predictions) == np.asarray(references)).mean())}

    monkeypatch.setattr(evaluate, "load", lambda *args, **kwargs: FakeAccuracy())
    accuracy = AccuracyMetric()
    assert accuracy.source == "evaluate"
    assert accuracy(np.array([1, 2, 3, 4]), np.array([1, -100, 0, 4])) == pytest.approx(2 / 3)
    assert metrics_module.masked_accuracy(np.array([1, 2, 3, 4]), np.array([1, -100, 0, 4])) == pytest.approx(2 / 3)


# ---- preprocessing ---------------------------------------------------------------------------------------


def text_splits(lines):
    return DatasetDict({"train": Dataset.from_dict({"text": lines})})


def test_line_by_line_drops_empty_lines_and_pads_only_when_asked(tokenizer):
    lines = ["the first line of text", "", "   ", "a second, longer line of text with more words in it"]
    unpadded = script_module("run_mlm").tokenize_for_masked_lm(text_splits(lines), tokenizer, 16, line_by_line=True, pad_to_max_length=False)["train"]
    assert len(unpadded) == 2
    lengths = [len(ids) for ids in unpadded["input_ids"]]
    assert lengths[0] < lengths[1] <= 16
    assert tokenizer.pad_token_id not in unpadded["input_ids"][0]
    padded = script_module("run_mlm").tokenize_for_masked_lm(text_splits(lines), tokenizer, 16, line_by_line=True, pad_to_max_length=True)["train"]
    assert len(padded) == 2 and {len(ids) for ids in padded["input_ids"]} == {16}
    assert padded["input_ids"][0][lengths[0]:] == [tokenizer.pad_token_id] * (16 - lengths[0])


def test_grouping_concatenates_and_drops_the_remainder(tokenizer, english_documents):
    raw = text_splits(english_documents[:20])
    total = sum(len(ids) for ids in tokenizer(english_documents[:20])["input_ids"])
    grouped = script_module("run_mlm").tokenize_for_masked_lm(raw, tokenizer, 24, line_by_line=False, pad_to_max_length=False)["train"]
    assert len(grouped) == total // 24
    assert {len(ids) for ids in grouped["input_ids"]} == {24}
    flat = [t for ids in tokenizer(english_documents[:20])["input_ids"] for t in ids]
    assert [t for ids in grouped["input_ids"] for t in ids] == flat[: (total // 24) * 24]


def test_causal_blocks_have_labels_equal_to_inputs_and_drop_the_remainder(tokenizer, english_documents):
    raw = text_splits(english_documents[:20])
    total = sum(len(ids) for ids in tokenizer(english_documents[:20])["input_ids"])
    blocks = script_module("run_clm").tokenize_for_causal_lm(raw, tokenizer, 24)["train"]
    assert len(blocks) == total // 24
    assert blocks["labels"] == blocks["input_ids"]
    assert {len(ids) for ids in blocks["input_ids"]} == {24}


def test_max_positions_account_for_the_roberta_padding_offset():
    assert max_positions_of(roberta_config()) == SEQ
    assert max_positions_of(bert_config()) == SEQ
    assert max_positions_of(gpt2_config()) == SEQ


def test_chunked_projection_loss_matches_full_logits():
    # Guards the equivalence the GPT-2 chunked path relies on, on uneven chunk sizes.
    torch.manual_seed(0)
    linear = nn.Linear(8, 50, bias=False)
    hidden, labels = torch.randn(2, 7, 8), torch.randint(0, 50, (2, 7))
    labels[0, 0] = -100
    expected = F.cross_entropy(linear(hidden).reshape(-1, 50), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(ChunkedVocabProjection(linear, 3).loss(hidden, labels), expected)
