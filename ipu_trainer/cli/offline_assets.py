"""Small, real assets built offline from text that ships with CPython.

The quick start and the tests need a tokenizer and some English text without touching a hub.
CPython's `pydoc_data` holds ~460 KB of English documentation (61 topics long enough to be documents):
enough to train a WordPiece vocabulary and to give a tiny BERT something learnable. The quick start adds
the docstrings of the standard library's modules (~300 more documents, read from the source files, no
module imported), so that next-sentence prediction is learned across topics rather than memorised.

The assets are the same bytes on every run and machine (with the same library versions), and
`python -m ipu_trainer.cli.offline_assets quickstart` writes them once: a manifest of their checksums lets a
later run recognise them and leave them, so the datasets and models built from them stay valid.
"""

from __future__ import annotations

import ast
import hashlib
import heapq
import logging
import os
import re
import sys
import sysconfig
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable

from tokenizers import ByteLevelBPETokenizer
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from transformers import BertTokenizer, GPT2Tokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def english_text_documents() -> list[str]:
    """Paragraph-sized English documents from CPython's bundled pydoc topics.

    Each topic is split on blank lines; indented code blocks and very short fragments are dropped so
    what remains reads as prose.
    """
    return [paragraph for topic in _topic_paragraphs() for paragraph in topic]


def english_text_topics() -> list[str]:
    """One document per pydoc topic (its prose paragraphs joined): long enough for sentence pairs
    to take their second half from the same document half of the time."""
    return [" ".join(topic) for topic in _topic_paragraphs() if len(topic) >= 3]


def _topic_paragraphs() -> list[list[str]]:
    from pydoc_data.topics import topics

    result = []
    for name in sorted(topics):
        paragraphs = []
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            lines = [line.strip() for line in paragraph.splitlines() if line.strip() and not line.startswith("   ")]
            text = " ".join(lines)
            if len(text.split()) >= 8:
                paragraphs.append(text)
        result.append(paragraphs)
    return result


# Standard-library folders whose docstrings are tests, demos or vendored code rather than documentation.
_SKIPPED_STDLIB_FOLDERS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo",
                           "ensurepip", "venv", "tkinter", "pydoc_data"}


def _prose_paragraphs(text: str) -> list[str]:
    """The paragraphs of `text` that read as prose: blank-line separated, indented and doctest lines dropped,
    at least eight words."""
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in paragraph.splitlines()
                 if line.strip() and not line.startswith("  ") and not line.strip().startswith((">>>", "..."))]
        joined = " ".join(lines)
        if len(joined.split()) >= 8:
            paragraphs.append(joined)
    return paragraphs


def stdlib_docstring_documents() -> list[str]:
    """One document per standard-library module with at least three prose paragraphs in its docstrings (the
    module's, its classes' and functions'), in a fixed order. Read with `ast` from the source files."""
    root = sysconfig.get_paths()["stdlib"]
    documents = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name not in _SKIPPED_STDLIB_FOLDERS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    tree = ast.parse(handle.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            paragraphs = []
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    paragraphs += _prose_paragraphs(ast.get_docstring(node) or "")
            if len(paragraphs) >= 3:
                documents.append(" ".join(paragraphs))
    return documents


WORDPIECE_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_vocabulary(
    texts: Iterable[str], vocab_size: int, special_tokens: list[str], min_frequency: int = 2
) -> list[str]:
    """An uncased WordPiece vocabulary learned as the `tokenizers` library's trainer learns one (byte-pair merges
    of each word's characters, pieces after the first prefixed "##"), with every tie broken by the strings.

    That trainer orders its alphabet and breaks ties between equally frequent pairs in hash-map order, which
    changes from process to process: the ids, and now and then a token at the vocabulary-size cut (so every
    number trained on them), came out differently from run to run. Here the most frequent pair is merged first,
    and of equally frequent pairs the first in string order. Order: the special tokens, the characters (sorted),
    then the merges as learned.
    """
    normalizer, pre_tokenizer = BertNormalizer(lowercase=True), BertPreTokenizer()
    word_counts = Counter(word for text in texts
                          for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    counts = [word_counts[word] for word in sorted(word_counts)]
    words = [[word[0]] + ["##" + character for character in word[1:]] for word in sorted(word_counts)]
    vocabulary = special_tokens + sorted({piece for word in words for piece in word} - set(special_tokens))
    known = set(vocabulary)

    pair_counts, words_with_pair = Counter(), defaultdict(set)
    for index, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[index]
            words_with_pair[pair].add(index)
    # A heap of (-count, pair): the most frequent pair first, ties in string order. A pair whose count changed
    # is pushed again; the stale entry is skipped when it comes up.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocabulary) < vocab_size and heap:
        negative_count, pair = heapq.heappop(heap)
        if -negative_count != pair_counts[pair]:
            continue
        if -negative_count < min_frequency:
            break
        merged = pair[0] + pair[1][len("##"):]
        if merged not in known:  # another split of the same letters may have made it already
            vocabulary.append(merged)
            known.add(merged)
        changed = set()
        for index in words_with_pair.pop(pair):
            word, merged_word, position = words[index], [], 0
            while position < len(word):
                if tuple(word[position:position + 2]) == pair:
                    merged_word.append(merged)
                    position += 2
                else:
                    merged_word.append(word[position])
                    position += 1
            for old in zip(word, word[1:]):
                pair_counts[old] -= counts[index]
                changed.add(old)
            for new in zip(merged_word, merged_word[1:]):
                pair_counts[new] += counts[index]
                words_with_pair[new].add(index)
                changed.add(new)
            words[index] = merged_word
        for changed_pair in changed:
            if pair_counts[changed_pair] > 0:
                heapq.heappush(heap, (-pair_counts[changed_pair], changed_pair))
    return vocabulary


def train_wordpiece_tokenizer(
    texts: list[str], output_dir: str, vocab_size: int = 2000, model_max_length: int = 512
) -> PreTrainedTokenizerBase:
    """Train an uncased BERT WordPiece tokenizer on `texts` and save it with `save_pretrained`: the same files
    from the same texts on every run."""
    os.makedirs(output_dir, exist_ok=True)
    vocab_path = os.path.join(output_dir, "vocab.txt")
    with open(vocab_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(wordpiece_vocabulary(texts, vocab_size, WORDPIECE_SPECIAL_TOKENS)) + "\n")
    tokenizer = BertTokenizer(vocab=vocab_path, model_max_length=model_max_length)
    tokenizer.save_pretrained(output_dir)
    return tokenizer


def write_quickstart_assets(
    output_dir: str, validation_fraction: float = 0.1, bpe: bool = False, with_docstrings: bool = False
) -> dict[str, str]:
    """Write a WordPiece tokenizer (BERT-style), optionally a byte-level BPE tokenizer (GPT-2-style), and a
    train/validation text corpus (one sentence per line, documents separated by blank lines): the pydoc topics,
    and with `with_docstrings` the standard library's docstrings too (the quick start's corpus).

    Returns the paths: {"tokenizer": ..., "train_file": ..., "validation_file": ...[, "bpe_tokenizer": ...]}.
    """
    documents = english_text_topics() + (stdlib_docstring_documents() if with_docstrings else [])
    n_validation = max(2, int(len(documents) * validation_fraction))
    # Every n-th topic goes to validation, so both parts cover the whole documentation.
    step = max(1, len(documents) // n_validation)
    validation = documents[::step]
    train = [d for i, d in enumerate(documents) if i % step]
    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "tokenizer": os.path.join(output_dir, "tokenizer"),
        "train_file": os.path.join(output_dir, "train.txt"),
        "validation_file": os.path.join(output_dir, "validation.txt"),
    }
    train_wordpiece_tokenizer(train, paths["tokenizer"])
    if bpe:
        paths["bpe_tokenizer"] = os.path.join(output_dir, "bpe_tokenizer")
        train_byte_level_bpe_tokenizer(train, paths["bpe_tokenizer"])
    for key, docs in (("train_file", train), ("validation_file", validation)):
        with open(paths[key], "w", encoding="utf-8") as f:
            f.write("\n\n".join(_one_sentence_per_line(d) for d in docs) + "\n")
    return paths


def _one_sentence_per_line(document: str) -> str:
    return re.sub(r"(?<=[.!?])\s+(?=[A-Z\"'(])", "\n", document)


def train_byte_level_bpe_tokenizer(
    texts: list[str], output_dir: str, vocab_size: int = 1000, model_max_length: int = 1024
) -> PreTrainedTokenizerBase:
    """Train a GPT-2-style byte-level BPE tokenizer on `texts` and save it with `save_pretrained`.

    The single special token is GPT-2's `<|endoftext|>` (bos, eos and unk). transformers 5 builds the
    tokenizer from the `vocab=` / `merges=` paths; its `vocab_file=` keywords would silently give a
    one-token tokenizer, hence the length check.
    """
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"])
    os.makedirs(output_dir, exist_ok=True)
    vocab_path, merges_path = bpe.save_model(output_dir)
    tokenizer = GPT2Tokenizer(
        vocab=vocab_path, merges=merges_path, model_max_length=model_max_length,
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    if len(tokenizer) != bpe.get_vocab_size():
        raise RuntimeError(f"byte-level BPE tokenizer has {len(tokenizer)} tokens, expected {bpe.get_vocab_size()}")
    tokenizer.save_pretrained(output_dir)
    return tokenizer


# What `python -m ipu_trainer.cli.offline_assets <folder>` writes into the folder, and the manifest of their
# checksums (`sha256sum -c` reads it) by which a later run recognises them as its own.
QUICKSTART_ASSETS = ("train.txt", "validation.txt", "tokenizer", "bpe_tokenizer")
MANIFEST_NAME = "offline_assets.sha256"


def sha256_of(path: str) -> str:
    """The hex SHA-256 of the file at `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def asset_files(folder: str) -> list[str]:
    """The files under `folder`'s QUICKSTART_ASSETS, as sorted paths relative to `folder` ("/"-separated)."""
    files = []
    for name in QUICKSTART_ASSETS:
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            for root, _, names in os.walk(path):
                files += [os.path.relpath(os.path.join(root, file), folder).replace(os.sep, "/") for file in names]
        elif os.path.lexists(path):
            files.append(name)
    return sorted(files)


def read_manifest(folder: str) -> dict[str, str]:
    """{relative path: sha256} from `folder`'s manifest; empty when there is none."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.exists(path):
        return {}
    manifest = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            checksum, _, name = line.rstrip("\n").partition("  ")
            if len(checksum) != 64 or not name:
                raise ValueError(f"{path} is not a manifest this command wrote: move it away, or build into "
                                 "another folder")
            manifest[name] = checksum
    return manifest


def quickstart_assets(folder: str) -> dict[str, str]:
    """The README quick starts' assets in `folder`: built there if absent, left as they are if this command
    built them before (every file the manifest lists is there with its checksum).

    Never overwrites a file it did not write: a file under the asset names that the manifest does not list, or
    one whose checksum differs from the manifest's, is refused (ValueError naming the file). A build that stops
    half-way leaves no files behind: it is built in a temporary folder and moved in, the manifest last.
    """
    manifest, manifest_path = read_manifest(folder), os.path.join(folder, MANIFEST_NAME)
    fix = "move it away, or build into another folder"
    for name in asset_files(folder):
        path = os.path.join(folder, name)
        if name not in manifest:
            raise ValueError(f"{path} was not written by this command (it is not in {manifest_path}), and building "
                             f"the quick-start assets would replace it: {fix}")
        if sha256_of(path) != manifest[name]:
            raise ValueError(f"{path} has changed since this command wrote it (its checksum differs from "
                             f"{manifest_path}'s): {fix}")
    paths = {
        "tokenizer": os.path.join(folder, "tokenizer"), "train_file": os.path.join(folder, "train.txt"),
        "validation_file": os.path.join(folder, "validation.txt"),
        "bpe_tokenizer": os.path.join(folder, "bpe_tokenizer"),
    }
    if manifest and all(os.path.exists(os.path.join(folder, name)) for name in manifest):
        logger.info("%s already holds the quick-start assets this command built (checked against %s): "
                    "left as they are", folder, manifest_path)
        return paths
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".offline_assets-") as build:
        write_quickstart_assets(build, bpe=True, with_docstrings=True)
        built = asset_files(build)
        for name in built:
            os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
            os.replace(os.path.join(build, name), os.path.join(folder, name))
    with open(manifest_path, "w", encoding="utf-8") as handle:
        handle.writelines(f"{sha256_of(os.path.join(folder, name))}  {name}\n" for name in built)
    logger.info("Built the quick-start assets in %s: %s (checksums in %s)", folder, ", ".join(QUICKSTART_ASSETS),
                manifest_path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """`python -m ipu_trainer.cli.offline_assets [folder]` (default `quickstart`): everything the README quick
    starts use. A file in the way is one `error:` line and exit code 2."""
    from .startup import LOG_FORMAT, run_cli

    argv = sys.argv[1:] if argv is None else argv
    folder = argv[0] if argv else "quickstart"
    logging.basicConfig(format=LOG_FORMAT, datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    return run_cli(lambda: quickstart_assets(folder))


if __name__ == "__main__":
    sys.exit(main())
