"""Small, real assets built offline from text that ships with CPython.

The quick start and the tests need a tokenizer and some English text without touching a hub.
CPython's `pydoc_data` holds ~460 KB of English documentation: enough to train a WordPiece
vocabulary and to give a tiny BERT something learnable.
"""

from __future__ import annotations

import os
import re

from tokenizers import BertWordPieceTokenizer
from transformers import BertTokenizer, PreTrainedTokenizerBase


def english_text_documents() -> list[str]:
    """Paragraph-sized English documents from CPython's bundled pydoc topics.

    Each topic is split on blank lines; indented code blocks and very short fragments are dropped so
    what remains reads as prose.
    """
    from pydoc_data.topics import topics

    documents = []
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            lines = [line.strip() for line in paragraph.splitlines() if line.strip() and not line.startswith("   ")]
            text = " ".join(lines)
            if len(text.split()) >= 8:
                documents.append(text)
    return documents


def train_wordpiece_tokenizer(
    texts: list[str], output_dir: str, vocab_size: int = 2000, model_max_length: int = 512
) -> PreTrainedTokenizerBase:
    """Train an uncased BERT WordPiece tokenizer on `texts` and save it with `save_pretrained`."""
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2)
    os.makedirs(output_dir, exist_ok=True)
    wordpiece.save_model(output_dir)
    tokenizer = BertTokenizer(vocab=os.path.join(output_dir, "vocab.txt"), model_max_length=model_max_length)
    tokenizer.save_pretrained(output_dir)
    return tokenizer
