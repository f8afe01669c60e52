import importlib
import json
import os
import re
import socket
import subprocess
import sys

import datasets
import huggingface_hub
import pytest
import torch

from ipu_trainer import IPUTrainingArguments
from ipu_trainer.cli import hub
from ipu_trainer.cli.offline_assets import english_text_documents, train_wordpiece_tokenizer, write_quickstart_assets
from ipu_trainer.cli.startup import run_cli


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` (`two_gpus`) are skipped on a machine with no (fewer than two) CUDA GPUs; on a GPU
    machine `pytest -m cuda tests` runs just them (bench/gpu_check.sh)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "cuda" in item.keywords and gpus == 0:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        elif "two_gpus" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs"))


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
    train/validation corpus of English documents, as `python -m ipu_trainer.cli.offline_assets` writes them."""
    return write_quickstart_assets(str(tmp_path_factory.mktemp("assets")), bpe=True)


# ---- the example scripts, run in-process ------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BERT = ("vocab_size=2000,hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,"
             "max_position_embeddings=64")
TINY_GPT2 = "vocab_size=1000,n_embd=32,n_layer=2,n_head=2,n_positions=64,bos_token_id=0,eos_token_id=0"
ONE_CPU = "layers_per_ipu=[-1],ipus_per_replica=1,replication_factor=1,gradient_accumulation_steps=2"


def quickstart_argv(script: str, assets: dict, output_dir, *extra: str) -> list[str]:
    """The README quick start's command for `script` ("run_mlm", "run_clm" or "run_pretraining") on the tiny
    assets: a two-step training run of a tiny model on one CPU into `output_dir` (which it may overwrite)."""
    if script == "run_clm":
        model = ["--model_type", "gpt2", "--config_overrides", TINY_GPT2, "--tokenizer_name", assets["bpe_tokenizer"],
                 "--block_size", "64"]
    else:
        model = ["--model_type", "bert", "--config_overrides", TINY_BERT, "--tokenizer_name", assets["tokenizer"],
                 "--max_seq_length", "64"]
    return [
        f"{script}.py", *model, "--train_file", assets["train_file"], "--validation_file", assets["validation_file"],
        "--ipu_config_name", REPO, "--ipu_config_overrides", ONE_CPU, "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "16", "--max_train_samples", "64", "--max_eval_samples", "16",
        "--do_train", "--max_steps", "2", "--save_strategy", "no", "--output_dir", str(output_dir),
        "--overwrite_output_dir", "--report_to", "none", "--disable_tqdm", "true", "--seed", "7", "--fp32", *extra,
    ]


def run_script(monkeypatch, argv: list[str]):
    """Run the script `argv[0]` names (e.g. "run_mlm.py") in-process, with `argv` as its command line."""
    monkeypatch.setattr(sys, "argv", argv)
    return script_module(os.path.basename(argv[0])[: -len(".py")]).main()


def loss_and_grads(model, batch: dict):
    """One training-mode forward and backward of `model` on `batch`: the loss and every parameter's gradient."""
    model.train()
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def innermost_optimizer(optimizer):
    """The optimizer that updates the weights, inside accelerate's and the offloading wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class UpdateCounter:
    """Counts the `step()` calls of an optimizer that update weights (an update skipped after a float16 overflow
    never calls it). The original's AdamW holds its per-parameter step count fixed, so that count cannot."""

    def __init__(self, optimizer):
        self.updates = 0
        innermost_optimizer(optimizer).register_step_post_hook(self._count)

    def _count(self, optimizer, args, kwargs):
        self.updates += 1


WORKER = os.path.join(REPO, "tests", "ddp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_worker(output_dir, *args, processes=1, check=True):
    """tests/ddp_worker.py with `args`, in one plain process or `processes` under torchrun (gloo on the CPU)."""
    if processes == 1:
        command = [sys.executable, WORKER, str(output_dir), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), WORKER, str(output_dir), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def assert_same_weights(dir_a, dir_b, rtol=1e-5, atol=1e-6):
    """The model.safetensors of two output folders hold the same weights (by default to float32 rounding)."""
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(dir_a, "model.safetensors")), load_file(os.path.join(dir_b, "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


def recorded_batches(monkeypatch, module):
    """Every masking collator the script builds, and the batches it collates."""
    from ipu_trainer.data.collators import DataCollatorForLanguageModelingWithMaxTokensMasked

    made, batches = [], []

    class Recording(DataCollatorForLanguageModelingWithMaxTokensMasked):
        def __post_init__(self):
            super().__post_init__()
            made.append(self)

        def __call__(self, examples):
            batch = super().__call__(examples)
            batches.append({key: value.clone() for key, value in batch.items()})
            return batch

    monkeypatch.setattr(module, "DataCollatorForLanguageModelingWithMaxTokensMasked", Recording)
    return made, batches


def assert_whole_words_masked(tokenizer, batches):
    """WordPiece: a '##' piece is labelled exactly when the piece before it is, unless that is a special token (a
    sentence cut to fit a pair may start with a '##' piece). Returns each batch's labelled positions."""
    special = set(tokenizer.all_special_tokens)
    pieces = 0
    for batch in batches:
        labelled = batch["labels"] != -100
        for row, ids in enumerate(batch["input_ids"].tolist()):
            original = [label if label != -100 else i for i, label in zip(ids, batch["labels"][row].tolist())]
            tokens = tokenizer.convert_ids_to_tokens(original)
            for position, token in enumerate(tokens):
                if token.startswith("##") and position > 0 and tokens[position - 1] not in special:
                    pieces += 1
                    assert labelled[row, position] == labelled[row, position - 1]
    assert pieces > 100
    return [batch["labels"] != -100 for batch in batches]


def read_json(path):
    with open(path) as handle:
        return json.load(handle)


def readme_section(heading: str) -> str:
    """The text of the README's `## heading` section, up to the next `## ` heading."""
    with open(os.path.join(REPO, "README.md")) as handle:
        text = handle.read()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def bash_blocks(text: str) -> list[list[str]]:
    """The lines of each ```bash block of `text`."""
    return [block.strip().splitlines() for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL)]


def script_module(script: str):
    """The top-level script (run_mlm, run_clm, run_pretraining, prepare_dataset) as a module."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    return importlib.import_module(script)


@pytest.fixture(scope="session")
def trained_output(assets, tmp_path_factory):
    """The output folder of a finished quick-start run_mlm training (model, tokenizer, results, checkpoint-2),
    built once."""
    output_dir = tmp_path_factory.mktemp("trained") / "out"
    monkeypatch = pytest.MonkeyPatch()
    try:
        monkeypatch.setattr(sys, "argv", quickstart_argv("run_mlm", assets, output_dir, "--save_strategy", "steps",
                                                         "--save_steps", "2"))
        assert run_cli(script_module("run_mlm").main) == 0  # run_cli also releases the run lock
    finally:
        monkeypatch.undo()
    return output_dir


def snapshot_files(folder, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), leaving out the top-level entries in `skip`."""
    files = {}
    for root, directories, names in os.walk(folder):
        if root == str(folder):
            directories[:] = [d for d in directories if d not in skip]
        for name in names:
            path = os.path.join(root, name)
            if root == str(folder) and name in skip:
                continue
            with open(path, "rb") as handle:
                files[os.path.relpath(path, folder)] = handle.read()
    return files


# ---- arguments and the hub, as the tests set them up ----------------------------------------------------------


def make_args(tmp_path, **values):
    """Training arguments of a quiet float32 CPU run writing into `tmp_path`/out, with `values` on top."""
    defaults = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, disable_tqdm=True, fp32=True)
    return IPUTrainingArguments(**{**defaults, **values})


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as the libraries see it once imported (they read the variable at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture
def unreachable(monkeypatch):
    """A hub endpoint that refuses connections (HF_ENDPOINT=http://127.0.0.1:9 as the libraries see it)."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_reachability", {})


def cache_hub_file(cache_dir, repo_id: str, filename: str, content: str, repo_type: str = "model") -> str:
    """Put `content` in a hub cache at `cache_dir` as `filename` of `repo_id`'s main branch, laid out as the hub
    libraries write it (refs/main naming a snapshot), so that they find it without asking the hub. Returns its path."""
    repo = os.path.join(str(cache_dir), f"{repo_type}s--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as handle:
        handle.write(commit)
    path = os.path.join(repo, "snapshots", commit, filename)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(content)
    return path


def gloo_threads() -> list[str] | None:
    """The names of this process's gloo threads (torch names them gloo_tcp_loop and pt_gloo_runloop), for the
    multi-process workers to report what outlives their teardown; None where /proc does not list threads."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return None
    names = []
    for task in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, task, "comm")) as handle:
                name = handle.read().strip()
        except OSError:  # the thread ended while listed
            continue
        if "gloo" in name:
            names.append(name)
    return sorted(names)


@pytest.fixture
def transformers_log(caplog):
    """caplog that also receives transformers' records at info level (transformers' loggers do not propagate to the
    root logger by default); its logging is put back afterwards."""
    import logging

    from transformers.utils import logging as hf_logging

    upstream = logging.getLogger("transformers")
    propagate, verbosity = upstream.propagate, hf_logging.get_verbosity()
    hf_logging.enable_propagation()
    hf_logging.set_verbosity_info()
    caplog.set_level(logging.INFO)
    try:
        yield caplog
    finally:
        hf_logging.set_verbosity(verbosity)
        upstream.propagate = propagate
