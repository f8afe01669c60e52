import pytest

from ipu_trainer.offline_assets import english_text_documents, train_wordpiece_tokenizer, write_quickstart_assets


@pytest.fixture(scope="session")
def english_documents():
    return english_text_documents()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, english_documents):
    """A 2000-token uncased WordPiece tokenizer saved with save_pretrained (model_max_length 512)."""
    path = tmp_path_factory.mktemp("tokenizer")
    train_wordpiece_tokenizer(english_documents, str(path))
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The README quick starts' assets: WordPiece and byte-level BPE (1000-token) tokenizers and a
    train/validation corpus of English documents, as `python -m ipu_trainer.offline_assets` writes them."""
    return write_quickstart_assets(str(tmp_path_factory.mktemp("assets")), bpe=True)
