#!/usr/bin/env python
"""Benchmark: NSP sentence-pair building, this pipeline vs a plain per-document Python baseline.

Both build BERT pretraining pairs (same sentence splitter, same recipe) from the same few MB of English
text (CPython's pydoc topics, shuffled and repeated to --megabytes):

(a) `ipu_trainer.data.nsp_pairs.build_nsp_pairs`: batched fast-tokenizer calls, pairs built on token
    ids, `datasets.map` over --num_proc processes (default 1: the Rust tokenizer then uses every core), Arrow output.
(b) baseline: transformers' legacy `TextDatasetForNextSentencePrediction` is gone from transformers 5,
    so this file carries the same recipe written the straightforward way: one `tokenizer.tokenize` +
    `convert_tokens_to_ids` call per sentence, pairs built as Python lists, one process.

tokens/s counts the corpus' tokens (the same number for both) over wall time, so the ratio of the two is
the speedup. The last line is `speedup: X.XXx`.

    python bench/preprocess.py [--megabytes 4] [--max_seq_length 128] [--num_proc 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import resource
import tempfile
import time

import datasets

from ipu_trainer.cli.offline_assets import english_text_documents, train_wordpiece_tokenizer
from ipu_trainer.data.nsp_pairs import build_nsp_pairs, split_sentences


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (datasets' worker processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def make_corpus(megabytes: float, seed: int = 0) -> list[str]:
    """pydoc paragraphs, shuffled and repeated until the text reaches `megabytes`."""
    paragraphs = english_text_documents()
    rng = random.Random(seed)
    documents, size = [], 0
    while size < megabytes * 1e6:
        rng.shuffle(paragraphs)
        # Join a few paragraphs per document so documents are article-sized, as in Wikipedia/BERT.
        for start in range(0, len(paragraphs), 8):
            document = "\n".join(paragraphs[start : start + 8])
            documents.append(document)
            size += len(document.encode())
            if size >= megabytes * 1e6:
                break
    return documents


def truncate_seq_pair(tokens_a: list, tokens_b: list, max_num_tokens: int, rng: random.Random) -> None:
    while len(tokens_a) + len(tokens_b) > max_num_tokens:
        trunc_tokens = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        if rng.random() < 0.5:
            del trunc_tokens[0]
        else:
            trunc_tokens.pop()


def baseline_pairs(texts: list[str], tokenizer, max_seq_length: int, short_seq_prob: float = 0.1, seed: int = 42):
    """The BERT recipe, per document and per sentence, in plain Python (what the legacy HF class did)."""
    rng = random.Random(seed)
    documents = []
    for text in texts:
        sentences = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(s)) for s in split_sentences(text)]
        sentences = [s for s in sentences if s]
        if sentences:
            documents.append(sentences)

    max_num_tokens = max_seq_length - 3
    examples = []
    for document_index, document in enumerate(documents):
        target_seq_length = max_num_tokens
        if rng.random() < short_seq_prob:
            target_seq_length = rng.randint(2, max_num_tokens)
        current_chunk, current_length, i = [], 0, 0
        while i < len(document):
            current_chunk.append(document[i])
            current_length += len(document[i])
            if i == len(document) - 1 or current_length >= target_seq_length:
                a_end = rng.randint(1, len(current_chunk) - 1) if len(current_chunk) >= 2 else 1
                tokens_a = [t for segment in current_chunk[:a_end] for t in segment]
                tokens_b = []
                if len(current_chunk) == 1 or rng.random() < 0.5:
                    is_random_next = 1
                    target_b_length = target_seq_length - len(tokens_a)
                    for _ in range(10):
                        random_document_index = rng.randint(0, len(documents) - 1)
                        if random_document_index != document_index:
                            break
                    random_document = documents[random_document_index]
                    for segment in random_document[rng.randint(0, len(random_document) - 1) :]:
                        tokens_b.extend(segment)
                        if len(tokens_b) >= target_b_length:
                            break
                    i -= len(current_chunk) - a_end
                else:
                    is_random_next = 0
                    tokens_b = [t for segment in current_chunk[a_end:] for t in segment]
                truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
                input_ids = [tokenizer.cls_token_id, *tokens_a, tokenizer.sep_token_id, *tokens_b, tokenizer.sep_token_id]
                token_type_ids = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
                padding = max_seq_length - len(input_ids)
                examples.append(
                    {
                        "input_ids": input_ids + [tokenizer.pad_token_id] * padding,
                        "attention_mask": [1] * len(input_ids) + [0] * padding,
                        "token_type_ids": token_type_ids + [0] * padding,
                        "next_sentence_label": is_random_next,
                    }
                )
                current_chunk, current_length = [], 0
            i += 1
    return examples


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=4.0, help="corpus size")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument(
        "--num_proc", type=int, default=1,
        help="processes for datasets.map; with 1 the Rust tokenizer spreads each batch over every core itself, "
        "which beats forked workers (where its threading is switched off) on a 2-core machine",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    datasets.disable_progress_bars()

    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = train_wordpiece_tokenizer(english_text_documents(), os.path.join(workdir, "tokenizer"))
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.path.join(workdir, "tokenizer"))
        texts = make_corpus(args.megabytes)
        corpus_tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        megabytes = sum(len(text.encode()) for text in texts) / 1e6
        print(f"corpus: {megabytes:.2f} MB, {len(texts)} documents, {corpus_tokens} tokens; "
              f"max_seq_length={args.max_seq_length}, cpus={os.cpu_count()}")

        start, cpu_start = time.perf_counter(), cpu_seconds()
        documents = datasets.Dataset.from_dict({"text": texts})
        pairs = build_nsp_pairs(documents, tokenizer, args.max_seq_length, num_proc=args.num_proc,
                                load_from_cache_file=False)
        pipeline_seconds, pipeline_cpu = time.perf_counter() - start, cpu_seconds() - cpu_start

        start, cpu_start = time.perf_counter(), cpu_seconds()
        baseline = baseline_pairs(texts, tokenizer, args.max_seq_length)
        baseline_seconds, baseline_cpu = time.perf_counter() - start, cpu_seconds() - cpu_start

    pipeline_rate = corpus_tokens / pipeline_seconds
    baseline_rate = corpus_tokens / baseline_seconds
    print(f"pipeline (build_nsp_pairs, num_proc={args.num_proc}): {len(pairs)} pairs in {pipeline_seconds:.2f} s "
          f"({pipeline_cpu:.2f} CPU s), {pipeline_rate:,.0f} tokens/s")
    print(f"baseline (per-sentence tokenize, Python lists): {len(baseline)} pairs in {baseline_seconds:.2f} s "
          f"({baseline_cpu:.2f} CPU s), {baseline_rate:,.0f} tokens/s")
    # Wall time is what a user waits for; CPU time shows the work done, which other load on a shared
    # machine does not change. Their ratio tells how much of the speedup is parallelism.
    print(f"CPU-time ratio (baseline / pipeline): {baseline_cpu / pipeline_cpu:.2f}x")
    speedup = pipeline_rate / baseline_rate
    print(f"speedup: {speedup:.2f}x")
    return speedup


if __name__ == "__main__":
    main()
