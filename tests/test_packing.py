"""Packed sequences: the packing plan, the packed rows, and packed models that compute exactly what the same
sequences unpacked compute (losses and gradients)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, BertConfig, RobertaConfig

from conftest import loss_and_grads, read_json, script_module
from ipu_trainer.data import packing
from ipu_trainer.data.collators import DataCollatorForLanguageModelingWithMaxTokensMasked
from ipu_trainer.data.packing import (
    DataCollatorForPackedSequences,
    PackedDataset,
    pack_dataset,
    pack_sequences,
    sequence_lengths,
)
from ipu_trainer.models import (
    BertForMaskedLMMaskedPositions,
    BertForPreTrainingMaskedPositions,
    RobertaForMaskedLMMaskedPositions,
)
from ipu_trainer.models.packed import block_diagonal_attention_mask, check_packing_attention
from ipu_trainer.training.metrics import pretraining_metrics, pretraining_predictions

SEQ = 64
CHUNKED = SimpleNamespace(recompute_checkpoint_every_layer=True, embedding_serialization_factor=2)


# ---- the packing plan ------------------------------------------------------------------------------------


def line_like_lengths(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.geometric(1 / 20, n) + 2, 3, SEQ)


def test_every_sequence_lands_in_exactly_one_row_that_it_fits():
    lengths = line_like_lengths(3000)
    plan = pack_sequences(lengths, SEQ, seed=1)
    assert sorted(plan.sequence_order.tolist()) == list(range(len(lengths)))
    row_tokens = [int(lengths[plan.row(r)].sum()) for r in range(plan.num_rows)]
    assert max(row_tokens) <= SEQ
    assert plan.efficiency == pytest.approx(sum(row_tokens) / (plan.num_rows * SEQ))
    # Near the lower bound ceil(tokens / SEQ) on a short-sequence distribution (padding 68% unpacked).
    assert plan.padding_before > 0.6
    assert plan.efficiency > 0.95
    assert plan.num_rows <= 1.05 * np.ceil(lengths.sum() / SEQ)


def test_packing_is_deterministic_for_a_seed_and_respects_the_row_limit():
    lengths = line_like_lengths(2000)
    first, again, other = (pack_sequences(lengths, SEQ, seed=s) for s in (3, 3, 4))
    assert np.array_equal(first.sequence_order, again.sequence_order)
    assert np.array_equal(first.row_offsets, again.row_offsets)
    assert not np.array_equal(first.sequence_order, other.sequence_order)
    limited = pack_sequences(lengths, SEQ, max_sequences_per_row=2, seed=3)
    assert limited.max_sequences_in_a_row == 2 < first.max_sequences_in_a_row


def one_at_a_time_best_fit_decreasing(lengths, max_length, limit=None):
    """The textbook algorithm, one sequence at a time: the number of rows it uses."""
    spaces, counts = [], []
    for length in sorted(lengths, reverse=True):
        fits = [i for i, space in enumerate(spaces) if space >= length and (limit is None or counts[i] < limit)]
        if fits:
            best = min(fits, key=lambda i: spaces[i])
            spaces[best] -= length
            counts[best] += 1
        else:
            spaces.append(max_length - length)
            counts.append(1)
    return len(spaces)


def test_the_histogram_packing_uses_as_many_rows_as_one_at_a_time_best_fit_decreasing():
    rng = np.random.default_rng(0)
    for case in range(60):
        max_length = int(rng.integers(8, 130))
        lengths = rng.integers(1, max_length + 1, int(rng.integers(1, 200)))
        limit = (None, 2, 3)[case % 3]
        plan = pack_sequences(lengths, max_length, max_sequences_per_row=limit, seed=case)
        assert plan.num_rows == one_at_a_time_best_fit_decreasing(lengths.tolist(), max_length, limit), case
        assert plan.num_rows >= plan.min_rows


def test_full_length_sequences_keep_a_row_each():
    plan = pack_sequences([SEQ, SEQ, 5, SEQ - 5], SEQ)
    assert plan.num_rows == plan.min_rows == 3 and plan.efficiency == 1.0
    # Two sequences of the same length share a row when they fit, and the short ones fill the gaps.
    assert pack_sequences([128, 100, 100, 20, 5, 60, 60], 128).num_rows == 4


@pytest.mark.parametrize("lengths, limit, message", [
    ([0, 4], None, r"lengths must be in \[1, 64\]"),
    ([65], None, r"lengths must be in \[1, 64\]"),
    ([4], 0, "max_sequences_per_row=0 must be >= 1"),
])
def test_bad_packing_input_is_a_value_error(lengths, limit, message):
    with pytest.raises(ValueError, match=message):
        pack_sequences(lengths, SEQ, max_sequences_per_row=limit)


def test_sequence_lengths_come_from_the_attention_mask_also_through_a_selection():
    masks = [[1] * n + [0] * (8 - n) for n in (3, 8, 1, 5)]
    dataset = Dataset.from_dict({"input_ids": [[7] * 8] * 4, "attention_mask": masks})
    assert sequence_lengths(dataset).tolist() == [3, 8, 1, 5]
    assert sequence_lengths(dataset.select([3, 0])).tolist() == [5, 3]
    ragged = Dataset.from_dict({"input_ids": [[1, 2], [1, 2, 3, 4]]})
    assert sequence_lengths(ragged).tolist() == [2, 4]
    assert sequence_lengths([{"input_ids": [1, 2, 3]}]).tolist() == [3]


def test_sequence_lengths_are_read_from_the_length_column_checked_on_the_first_rows(monkeypatch):
    """prepare_dataset.py's `length` column spares --packing a pass over every row's attention_mask: past the first
    CHECKED_LENGTH_ROWS rows only the column is read (here the masks there disagree with it, and the column wins),
    and a column that disagrees with the first rows' masks is refused."""
    monkeypatch.setattr(packing, "CHECKED_LENGTH_ROWS", 2)
    masks = [[1] * n + [0] * (8 - n) for n in (3, 8, 1, 5)]
    dataset = Dataset.from_dict({"input_ids": [[7] * 8] * 4, "attention_mask": masks, "length": [3, 8, 2, 2]})
    assert sequence_lengths(dataset).tolist() == [3, 8, 2, 2]
    assert sequence_lengths(dataset.select([1, 0, 3])).tolist() == [8, 3, 2]
    with pytest.raises(ValueError, match="'length' column does not hold the sum of each row's attention_mask"):
        sequence_lengths(dataset.select([2, 0]))


# ---- packed rows -----------------------------------------------------------------------------------------


def test_rows_restart_positions_and_keep_token_types_and_a_cls_per_sequence():
    pairs = [  # [CLS]=2 A [SEP]=3 B [SEP], right-padded to 8
        dict(input_ids=[2, 10, 3, 11, 3, 0, 0, 0], attention_mask=[1] * 5 + [0] * 3,
             token_type_ids=[0, 0, 0, 1, 1, 0, 0, 0], next_sentence_label=1),
        dict(input_ids=[2, 12, 13, 3, 14, 3, 0, 0], attention_mask=[1] * 6 + [0] * 2,
             token_type_ids=[0, 0, 0, 0, 1, 1, 0, 0], next_sentence_label=0),
        dict(input_ids=[2, 15, 3, 16, 3, 0, 0, 0], attention_mask=[1] * 5 + [0] * 3,
             token_type_ids=[0, 0, 0, 1, 1, 0, 0, 0], next_sentence_label=0),
    ]
    collator = DataCollatorForPackedSequences(max_seq_length=12, pad_token_id=0, max_sequences_per_row=3)
    batch = collator([[pairs[1], pairs[0]], [pairs[2]]])
    assert batch["input_ids"].tolist() == [[2, 12, 13, 3, 14, 3, 2, 10, 3, 11, 3, 0], [2, 15, 3, 16, 3] + [0] * 7]
    assert batch["token_type_ids"].tolist()[0] == [0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0]
    assert batch["position_ids"].tolist()[0] == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0]
    assert batch["sequence_ids"].tolist() == [[1] * 6 + [2] * 5 + [0], [1] * 5 + [0] * 7]
    assert batch["cls_positions"].tolist() == [[0, 6, 0], [0, 0, 0]]
    assert batch["next_sentence_label"].tolist() == [[0, 1, -100], [0, -100, -100]]
    assert "labels" not in batch and "attention_mask" not in batch


def test_left_padded_sequences_are_refused():
    example = dict(input_ids=[0, 0, 2, 3], attention_mask=[0, 0, 1, 1])
    with pytest.raises(ValueError, match="right-padded"):
        DataCollatorForPackedSequences(max_seq_length=8, pad_token_id=0)([[example]])


def test_each_sequence_is_masked_with_its_own_cap_and_rows_keep_at_most_k_labels(tokenizer, english_documents):
    masking = DataCollatorForLanguageModelingWithMaxTokensMasked(
        tokenizer, mlm_probability=0.5, max_seq_length=SEQ, max_num_masked_tokens=6, seed=0)
    sequences = [dict(tokenizer(doc, truncation=True, max_length=20)) for doc in english_documents[:12]]
    rows = [sequences[i : i + 3] for i in range(0, 12, 3)]
    for cap, expected_max in ((None, 18), (10, 10)):
        collator = DataCollatorForPackedSequences(max_seq_length=SEQ, pad_token_id=tokenizer.pad_token_id,
                                                  masking=masking, max_num_masked_tokens=cap, seed=1)
        batch = collator(rows)
        labelled = batch["labels"] != -100
        for row, row_sequences in enumerate(rows):
            per_sequence = [int(labelled[row][batch["sequence_ids"][row] == s + 1].sum()) for s in range(3)]
            assert max(per_sequence) <= 6  # the masking collator's per-sequence cap
            assert sum(per_sequence) <= expected_max
        assert int(labelled.sum(1).max()) == expected_max  # the row cap binds here (p = 0.5)
        original = torch.full_like(batch["input_ids"], tokenizer.pad_token_id)
        for row, row_sequences in enumerate(rows):
            ids = [token for sequence in row_sequences for token in sequence["input_ids"]]
            original[row, : len(ids)] = torch.tensor(ids)
        # Labels hold the original tokens; every position without a label (capped ones too) is unchanged.
        assert torch.equal(batch["labels"][labelled], original[labelled])
        assert torch.equal(batch["input_ids"][~labelled], original[~labelled])
        special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
        assert not (labelled & special).any()


def test_packed_dataset_fetches_a_batch_of_rows_in_one_call():
    source = Dataset.from_dict({"input_ids": [[i] * (i + 1) for i in range(6)]})
    calls = []

    class Recording:
        def __len__(self):
            return len(source)

        def __getitems__(self, keys):
            calls.append(list(keys))
            return source.__getitems__(keys)

    plan = pack_sequences(sequence_lengths(source), 7, seed=0)
    packed = PackedDataset(Recording(), plan)
    rows = packed.__getitems__(range(len(packed)))
    assert len(calls) == 1
    assert sorted(example["input_ids"][0] for row in rows for example in row) == list(range(6))
    assert [len(row) for row in rows] == np.diff(plan.row_offsets).tolist()


# ---- packed models: same losses and gradients as the same sequences unpacked ------------------------------


def bert_config(**extra):
    return BertConfig(vocab_size=2000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **extra)


@pytest.fixture(scope="module")
def nsp_pairs(tokenizer_dir, english_documents):
    """Masked sentence pairs of varied length, right-padded to SEQ: (unpacked batch, packed batch)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sequences = []
    for i, length in enumerate([20, 64, 12, 33, 40, 18, 27, 9, 50, 14]):
        encoded = tokenizer(english_documents[2 * i], english_documents[2 * i + 1], truncation=True,
                            max_length=length, padding="max_length")
        encoded = tokenizer.pad(dict(encoded), padding="max_length", max_length=SEQ)
        sequences.append(dict(encoded, next_sentence_label=i % 2))
    masking = DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, mlm_probability=0.15, seed=0)
    unpacked = masking(sequences)
    masked = [dict(sequences[i], input_ids=unpacked["input_ids"][i].tolist(), labels=unpacked["labels"][i].tolist())
              for i in range(len(sequences))]
    plan = pack_sequences(sequence_lengths(masked), SEQ, seed=0)
    rows = PackedDataset(masked, plan).__getitems__(range(plan.num_rows))
    packed = DataCollatorForPackedSequences(max_seq_length=SEQ, pad_token_id=tokenizer.pad_token_id)(rows)
    order = plan.sequence_order.tolist()  # the packed sequences' order, for the per-sequence outputs
    assert plan.num_rows < len(sequences)
    return {key: value[order] for key, value in unpacked.items()}, packed


def assert_same_loss_and_grads(model, unpacked, packed):
    loss, grads = loss_and_grads(model, unpacked)
    packed_loss, packed_grads = loss_and_grads(model, packed)
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=0)
    assert packed_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("variant", ["packed-labels", "static-k", "chunked+recompute"])
def test_packed_pretraining_batch_gives_the_unpacked_losses_and_gradients(nsp_pairs, variant):
    unpacked, packed = nsp_pairs
    torch.manual_seed(0)
    model = BertForPreTrainingMaskedPositions(bert_config(max_num_masked_tokens=SEQ))
    model.static_masked_positions = variant == "static-k"
    if variant == "chunked+recompute":
        model.parallelize(CHUNKED)
    assert_same_loss_and_grads(model, unpacked, packed)

    # Each part on its own, and the NSP logits per sequence (the unpacked rows are in the packed order).
    model.eval()
    with torch.no_grad():
        expected, got = model(**unpacked), model(**packed)
    torch.testing.assert_close(got.mlm_loss, expected.mlm_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.nsp_loss, expected.nsp_loss, rtol=1e-5, atol=0)
    slots = packed["next_sentence_label"] != -100
    torch.testing.assert_close(got.seq_relationship_logits[slots], expected.seq_relationship_logits, rtol=1e-5, atol=1e-6)


def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_packed_batch_on_a_gpu_runs_the_memory_efficient_attention_kernel(nsp_pairs, dtype):
    """On a GPU the block-diagonal mask must be one the fused memory-efficient SDPA kernel takes (dtype, layout,
    alignment under autocast). With only that kernel allowed an ineligible mask is an error instead of a silent
    fall back to the slow math kernel; the packed batch gives the unpacked losses and gradients (to half precision's
    rounding under autocast)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    unpacked, packed = ({key: value.cuda() for key, value in batch.items()} for batch in nsp_pairs)
    torch.manual_seed(0)
    model = BertForPreTrainingMaskedPositions(bert_config(max_num_masked_tokens=SEQ)).cuda()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        loss, grads = loss_and_grads(model, unpacked)
        packed_loss, packed_grads = loss_and_grads(model, packed)
    assert torch.isfinite(packed_loss) and relative_difference(packed_loss, loss) <= tolerance
    assert packed_grads.keys() == grads.keys()
    for name in grads:
        if name.endswith("attention.self.key.bias"):
            continue  # zero but for rounding: a key bias adds the same score to every key, which softmax cancels
        assert relative_difference(packed_grads[name], grads[name]) <= tolerance, name


def test_pretraining_metrics_score_packed_nsp_per_sequence(nsp_pairs):
    _, packed = nsp_pairs
    torch.manual_seed(0)
    model = BertForPreTrainingMaskedPositions(bert_config(max_num_masked_tokens=SEQ)).eval()
    with torch.no_grad():
        output = model(**packed)
    logits = (output.prediction_logits, output.seq_relationship_logits, output.masked_lm_labels)
    predictions = pretraining_predictions(logits, (packed["labels"], packed["next_sentence_label"]))
    assert predictions[2].shape == packed["next_sentence_label"].shape
    metrics = pretraining_metrics(SimpleNamespace(predictions=[p.numpy() for p in predictions]))
    slots = packed["next_sentence_label"] != -100
    expected = (output.seq_relationship_logits.argmax(-1)[slots] == packed["next_sentence_label"][slots]).float().mean()
    assert metrics["nsp_accuracy"] == pytest.approx(expected.item())
    # The two losses reported apart are the model's own two parts of its loss.
    assert metrics["mlm_loss"] == pytest.approx(output.mlm_loss.item(), rel=1e-5)
    assert metrics["nsp_loss"] == pytest.approx(output.nsp_loss.item(), rel=1e-5)


def roberta_config(pad_token_id, **extra):
    return RobertaConfig(vocab_size=2000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=SEQ + pad_token_id + 1,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=pad_token_id,
                         **extra)


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("variant", ["packed-labels", "chunked+recompute"])
def test_packed_line_by_line_batch_gives_the_unpacked_losses_and_gradients(tokenizer_dir, assets, family, variant):
    """run_mlm.py --line_by_line --packing: lines tokenized as the script does, masked by the same collator (the
    packed collator masks each line exactly as the unpacked collator does), same loss and gradients."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    lines = DatasetDict({"train": Dataset.from_dict({"text": open(assets["train_file"]).read().splitlines()[:60]})})
    dataset = script_module("run_mlm").tokenize_for_masked_lm(lines, tokenizer, SEQ, line_by_line=True, pad_to_max_length=False)["train"]
    masking = DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, mlm_probability=0.15, max_seq_length=SEQ,
                                                                  seed=3)
    packed_dataset = pack_dataset(dataset.select(range(16)), SEQ, seed=0)
    rows = packed_dataset.__getitems__(range(len(packed_dataset)))
    assert len(rows) < 16
    packed = DataCollatorForPackedSequences(max_seq_length=SEQ, pad_token_id=tokenizer.pad_token_id, masking=masking,
                                            max_num_masked_tokens=None)(rows)
    unpacked = masking([dict(example) for row in rows for example in row])
    assert torch.equal(torch.sort(packed["labels"][packed["labels"] != -100]).values,
                       torch.sort(unpacked["labels"][unpacked["labels"] != -100]).values)

    torch.manual_seed(0)
    if family == "bert":
        model = BertForMaskedLMMaskedPositions(bert_config(max_num_masked_tokens=16))
    else:
        model = RobertaForMaskedLMMaskedPositions(roberta_config(tokenizer.pad_token_id, max_num_masked_tokens=16))
    if variant == "chunked+recompute":
        model.parallelize(CHUNKED)
    assert_same_loss_and_grads(model, unpacked, packed)


def test_attention_never_crosses_sequences():
    sequence_ids = torch.tensor([[1, 1, 1, 2, 2, 0]])
    mask = block_diagonal_attention_mask(sequence_ids, torch.float32)[0, 0]
    assert (mask == 0).tolist() == [
        [True, True, True, False, False, False], [True, True, True, False, False, False],
        [True, True, True, False, False, False], [False, False, False, True, True, False],
        [False, False, False, True, True, False], [False, False, False, False, False, True]]

    torch.manual_seed(0)
    model = BertForMaskedLMMaskedPositions(bert_config()).eval()
    batch = dict(input_ids=torch.tensor([[2, 10, 11, 3, 2, 12, 3, 0]]), position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0]]),
                 sequence_ids=torch.tensor([[1, 1, 1, 1, 2, 2, 2, 0]]))
    changed = dict(batch, input_ids=torch.tensor([[2, 10, 11, 3, 2, 99, 3, 0]]))
    with torch.no_grad():
        first, second = model(**batch).logits, model(**changed).logits
    torch.testing.assert_close(first[0, :4], second[0, :4])  # the first sequence never sees the second
    assert not torch.allclose(first[0, 4:7], second[0, 4:7])


def test_flash_attention_is_refused_for_packed_rows():
    # Private upstream touchpoint: the attention implementation is only readable as config._attn_implementation.
    config = bert_config()
    assert hasattr(config, "_attn_implementation"), "transformers renamed config._attn_implementation"
    check_packing_attention(config)
    config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'.*sdpa"):
        check_packing_attention(config)


# ---- the scripts' --packing -------------------------------------------------------------------------------

import os  # noqa: E402
import sys  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

from ipu_trainer.data.nsp_pairs import add_mlm_labels, build_nsp_pairs, load_text_documents  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import run_mlm  # noqa: E402
import run_pretraining  # noqa: E402

TINY_BERT = "vocab_size=2000,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,max_position_embeddings=64"
ONE_CPU = "layers_per_ipu=[-1],ipus_per_replica=1,replication_factor=1,gradient_accumulation_steps=2,recompute_checkpoint_every_layer=false"


@pytest.fixture(scope="module")
def short_pairs(assets, tmp_path_factory):
    """Pre-built sentence pairs of length 64, half of them short (short_seq_prob 0.5), dynamic and pre-masked."""
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    documents = load_text_documents({"train": assets["train_file"]})["train"]
    pairs = build_nsp_pairs(documents, tokenizer, SEQ, short_seq_prob=0.5, seed=1).select(range(240))
    folders = {}
    for masking, data in (("dynamic", pairs), ("static", add_mlm_labels(pairs, tokenizer, mask_input_ids=True))):
        folder = tmp_path_factory.mktemp(f"pairs-{masking}")
        DatasetDict({"train": data.select(range(200)), "validation": data.select(range(200, 240))}).save_to_disk(str(folder))
        folders[masking] = str(folder)
    return folders


def pretraining_argv(assets, data, output_dir, *extra):
    return [
        "run_pretraining.py", "--model_type", "bert", "--config_overrides", TINY_BERT, "--tokenizer_name",
        assets["tokenizer"], "--dataset_path", data, "--is_already_preprocessed", "--ipu_config_name", REPO,
        "--ipu_config_overrides", ONE_CPU, "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--learning_rate", "3e-3", "--output_dir", str(output_dir), "--report_to", "none", "--disable_tqdm", "true",
        "--seed", "7", "--packing", *extra,
    ]


@pytest.mark.parametrize("masking", ["dynamic", "static"])
def test_run_pretraining_packs_prebuilt_pairs_and_says_how_many_per_row(assets, short_pairs, tmp_path, monkeypatch,
                                                                        caplog, masking):
    argv = pretraining_argv(assets, short_pairs[masking], tmp_path / "out", "--do_train", "--do_eval", "--max_steps", "3",
                            *(["--is_already_masked"] if masking == "static" else []))
    monkeypatch.setattr(sys, "argv", argv)
    with caplog.at_level("INFO", logger="ipu_trainer"):
        run_pretraining.main()
    results = read_json(tmp_path / "out" / "all_results.json")
    assert np.isfinite(results["eval_loss"]) and "eval_nsp_accuracy" in results and "eval_mlm_accuracy" in results
    assert results["train_samples"] < 200  # packed rows, fewer than the 200 pairs
    messages = [record.getMessage() for record in caplog.records]
    assert any("Packed the train data" in m and "sequences per row on average" in m for m in messages)
    assert any(m.startswith("--packing: a micro-batch is 4 packed rows") for m in messages)


def test_run_pretraining_with_packing_resumes_to_the_same_weights(assets, short_pairs, tmp_path, monkeypatch):
    """The packing is deterministic, so a resumed run sees the same rows as an uninterrupted one."""
    args = ("--do_train", "--max_steps", "4", "--save_steps", "2", "--lr_scheduler_type", "linear")
    monkeypatch.setattr(sys, "argv", pretraining_argv(assets, short_pairs["dynamic"], tmp_path / "straight", *args))
    run_pretraining.main()

    original_step = run_pretraining.IPUTrainer.training_step

    def crash_after_first_checkpoint(self, *a, **k):
        if self.state.global_step == 3:
            raise KeyboardInterrupt("simulated crash")
        return original_step(self, *a, **k)

    monkeypatch.setattr(run_pretraining.IPUTrainer, "training_step", crash_after_first_checkpoint)
    monkeypatch.setattr(sys, "argv", pretraining_argv(assets, short_pairs["dynamic"], tmp_path / "resumed", *args))
    with pytest.raises(KeyboardInterrupt):
        run_pretraining.main()
    monkeypatch.setattr(run_pretraining.IPUTrainer, "training_step", original_step)
    run_pretraining.main()  # finds checkpoint-2 and resumes
    expected = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def mlm_argv(assets, output_dir, *extra):
    return [
        "run_mlm.py", "--model_type", "bert", "--config_overrides", TINY_BERT, "--tokenizer_name", assets["tokenizer"],
        "--train_file", assets["train_file"], "--validation_file", assets["validation_file"], "--max_seq_length",
        str(SEQ), "--ipu_config_name", REPO, "--ipu_config_overrides", ONE_CPU, "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8", "--max_train_samples", "200", "--max_eval_samples", "40",
        "--output_dir", str(output_dir), "--report_to", "none", "--disable_tqdm", "true", "--seed", "7", "--fp32",
        "--packing", *extra,
    ]


def test_run_mlm_packs_lines(assets, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sys, "argv", mlm_argv(assets, tmp_path / "out", "--line_by_line", "--do_train", "--do_eval",
                                              "--max_steps", "3"))
    with caplog.at_level("INFO", logger="ipu_trainer"):
        run_mlm.main()
    results = read_json(tmp_path / "out" / "all_results.json")
    assert np.isfinite(results["eval_loss"]) and 0 <= results["eval_accuracy"] <= 1
    assert results["train_samples"] < 200 / 1.5  # lines of ~30 tokens: about two per row of 64
    assert any("Packed the train data" in record.getMessage() for record in caplog.records)


def test_run_mlm_packing_needs_line_by_line(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", mlm_argv(assets, tmp_path / "out", "--do_train"))
    with pytest.raises(ValueError, match="--packing needs --line_by_line"):
        run_mlm.main()


def test_the_training_log_counts_sequences_and_their_tokens_in_packed_rows():
    from ipu_trainer.training.throughput import ThroughputMeter

    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

    meter = ThroughputMeter(torch.device("cpu"), clock=Clock())
    meter.window_metrics()  # the warm-up window ends
    packed = {"input_ids": torch.ones(2, 8, dtype=torch.long),
              "sequence_ids": torch.tensor([[1, 1, 2, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]])}
    with pytest.MonkeyPatch.context() as patch:  # counting stays on the device, as for unpacked batches
        for method in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu"):
            patch.setattr(torch.Tensor, method, lambda *a, **k: pytest.fail("counting a batch synced the host"))
        meter.count_batch(packed)
    meter.clock.now += 2.0
    assert meter.window_metrics() == {"samples_per_second": 2.0, "tokens_per_second": 6.5}  # 4 sequences, 13 tokens
