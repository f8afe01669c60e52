"""The pretraining benchmark runs end to end (tiny sizes), and the CPU-packed MLM head it measures is exact."""

import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForPreTraining

from ipu_trainer.data.collators import DataCollatorForLanguageModelingWithMaxTokensMasked
from ipu_trainer.models import BertForPreTrainingMaskedPositions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # the whole benchmark in a subprocess
def test_bench_prints_both_rows_and_the_speedup():
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "pretrain.py"), "--preset", "cpu", "--tiny",
         "--steps", "2", "--warmup-steps", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    row = r"\s+\d+\.\d\s+\d+\.\d\s+\d+\s+\d+ \([+-]\d+\)$"  # samples/s, (mean), tokens/s, peak RSS (rise)
    assert any(line.startswith("(a) IPUTrainer") and re.search(row, line) for line in lines), done.stdout
    assert any(line.startswith("(b) Trainer") and re.search(row, line) for line in lines), done.stdout
    assert re.fullmatch(r"speedup: \d+\.\d\dx", lines[-1]), done.stdout


def test_packed_head_matches_gathered_head_and_bert_for_pretraining(tokenizer_dir, english_documents):
    """Training on the CPU packs the labelled positions; loss and gradients equal the static-K gather's
    (the accelerator path) and upstream's full-sequence head."""
    # An own instance: padding/truncation calls leave state in a fast tokenizer that other tests share.
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, max_num_masked_tokens=16)
    examples = [dict(tokenizer(english_documents[i], truncation=True, max_length=64, padding="max_length"),
                     next_sentence_label=i % 2) for i in range(6)]
    batch = DataCollatorForLanguageModelingWithMaxTokensMasked(tokenizer, mlm_probability=0.15, seed=0)(examples)

    torch.manual_seed(0)
    packed = BertForPreTrainingMaskedPositions(config)
    gathered = BertForPreTrainingMaskedPositions(config)
    gathered.static_masked_positions = True
    reference = BertForPreTraining(config)
    gathered.load_state_dict(packed.state_dict())
    reference.load_state_dict(packed.state_dict())

    results = []
    for model in (packed, gathered, reference):
        model.train()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=0)
        assert grads.keys() == results[0][1].keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results[0][1][name], rtol=1e-4, atol=1e-7, msg=name)
