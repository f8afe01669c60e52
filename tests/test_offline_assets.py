"""The offline quick-start assets: a WordPiece vocabulary learned the same way on every run, and tokenizers
transformers loads."""

import pytest

from ipu_trainer.cli.offline_assets import WORDPIECE_SPECIAL_TOKENS, wordpiece_vocabulary


@pytest.mark.parametrize("text, merge", [("cd cd ab ab", "ab"), ("cd cd cd ab ab", "cd")])
def test_wordpiece_merges_the_most_frequent_pair_and_ties_in_string_order(text, merge):
    # After the specials and the four characters there is room for one merge: "ab" and "cd" tie in the first
    # text (the first in string order wins, wherever it stands in the text); "cd" is more frequent in the second.
    vocabulary = wordpiece_vocabulary([text], vocab_size=len(WORDPIECE_SPECIAL_TOKENS) + 5,
                                      special_tokens=WORDPIECE_SPECIAL_TOKENS)
    assert vocabulary == WORDPIECE_SPECIAL_TOKENS + ["##b", "##d", "a", "c", merge]


def test_wordpiece_stops_below_the_minimum_frequency():
    vocabulary = wordpiece_vocabulary(["ab ab cd"], vocab_size=100, special_tokens=WORDPIECE_SPECIAL_TOKENS)
    assert vocabulary[-1] == "ab"


def test_the_tokenizers_load_with_auto_tokenizer_and_tokenize_a_sentence(assets):
    from transformers import AutoTokenizer

    sentence = "The return statement leaves the current function call."
    bert = AutoTokenizer.from_pretrained(assets["tokenizer"])
    assert len(bert) == 2000 and set(bert.all_special_tokens) == set(WORDPIECE_SPECIAL_TOKENS)
    ids = bert(sentence)["input_ids"]
    assert bert.unk_token_id not in ids
    assert bert.decode(ids, skip_special_tokens=True) == sentence.lower()
    gpt2 = AutoTokenizer.from_pretrained(assets["bpe_tokenizer"])
    assert len(gpt2) == 1000 and gpt2.eos_token == "<|endoftext|>"
    assert gpt2.decode(gpt2(sentence)["input_ids"]) == sentence
