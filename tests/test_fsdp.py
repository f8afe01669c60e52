"""--fsdp (FSDP2 through transformers / accelerate): the IPU config's batch math with the model sharded over 2 gloo
processes, checkpoints that resume after a crash, the final model a plain transformers checkpoint; the refusals;
the one private accelerate touchpoint (run/fsdp.py's shard_cpu_processes)."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_BERT, TINY_GPT2, free_port, make_args, read_json
from ipu_trainer.run.fsdp import check_fsdp_processes, fsdp_plugin_arguments, layers_to_wrap, output_embedding_group

# Dropout off: each process draws its own dropout masks, which would differ from the one-process reference.
NO_DROPOUT = {"run_clm": ",resid_pdrop=0,embd_pdrop=0,attn_pdrop=0",
              "run_pretraining": ",hidden_dropout_prob=0,attention_probs_dropout_prob=0"}
# Replicas 2 x accumulation 2, from the repository's ipu_config.json (recomputation on, as the seed config).
PLACEMENT = "layers_per_ipu=[-1],ipus_per_replica=1,replication_factor=2,gradient_accumulation_steps=2"


@pytest.fixture(scope="module")
def masked_pairs(assets, tmp_path_factory) -> str:
    """Sentence pairs masked once, offline (as prepare_dataset.py writes them): masking on the fly draws from each
    batch's content, and a process collates only its share of a batch, so the masks would differ from one
    process's and with them the weights, whatever the sharding."""
    from datasets import DatasetDict
    from transformers import AutoTokenizer

    from ipu_trainer.data.nsp_pairs import add_mlm_labels, build_nsp_pairs, load_text_documents

    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    documents = load_text_documents({"train": assets["train_file"]})["train"]
    pairs = add_mlm_labels(build_nsp_pairs(documents, tokenizer, 64, seed=1).select(range(64)), tokenizer,
                           mask_input_ids=True)
    folder = tmp_path_factory.mktemp("masked-pairs")
    DatasetDict({"train": pairs}).save_to_disk(str(folder))
    return str(folder)


def command(script: str, data: tuple, output_dir, processes: int, *extra: str) -> list[str]:
    """4 steps of plain SGD (Adam would turn float noise into larger differences), checkpoints every 2. `data`: the
    assets, and for run_pretraining.py the masked pairs' folder."""
    assets, pairs = data
    if script == "run_clm":
        model = ["--model_type", "gpt2", "--config_overrides", TINY_GPT2 + NO_DROPOUT[script], "--tokenizer_name",
                 assets["bpe_tokenizer"], "--block_size", "64", "--train_file", assets["train_file"]]
    else:
        model = ["--model_type", "bert", "--config_overrides", TINY_BERT + NO_DROPOUT[script], "--tokenizer_name",
                 assets["tokenizer"], "--dataset_path", pairs, "--is_already_preprocessed", "--is_already_masked"]
    flags = [
        *model, "--ipu_config_name", REPO,
        "--ipu_config_overrides", PLACEMENT, "--per_device_train_batch_size", "2", "--max_train_samples", "64",
        "--do_train", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--output_dir",
        str(output_dir), "--report_to", "none", "--disable_tqdm", "true", "--seed", "7", "--fp32", "--optim", "sgd",
        "--learning_rate", "0.5", "--lr_scheduler_type", "constant", *extra,
    ]
    path = os.path.join(REPO, f"{script}.py")
    if processes == 1:
        return [sys.executable, path, *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), path, *flags]


def run(command):
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def largest_relative_difference(dir_a, dir_b) -> float:
    a, b = load_file(os.path.join(dir_a, "model.safetensors")), load_file(os.path.join(dir_b, "model.safetensors"))
    assert set(a) <= set(b)  # the FSDP file may also write a tied weight's second name (the same values)
    # BERT's key biases stay zero but for rounding (a key bias adds one score to every key of a query, which softmax
    # cancels: their gradient is rounding noise, about 1e-12 here), so their relative difference means nothing.
    return max(((a[name] - b[name]).norm() / a[name].norm()).item() for name in a
               if not name.endswith("attention.self.key.bias"))


@pytest.mark.slow
@pytest.mark.parametrize("script", ["run_clm", "run_pretraining"])
def test_two_fsdp_processes_reach_the_weights_of_one_process_and_resume_after_a_crash(request, tmp_path, script):
    data = (request.getfixturevalue("assets"), request.getfixturevalue("masked_pairs") if script != "run_clm" else None)
    reference, sharded, crashed = tmp_path / "one", tmp_path / "fsdp", tmp_path / "crashed"
    run(command(script, data, reference, 1))
    result = run(command(script, data, sharded, 2, "--fsdp", "full_shard"))
    assert "sharded over 2 processes (FSDP2 full_shard" in result.stderr + result.stdout
    assert largest_relative_difference(reference, sharded) <= 1e-4
    checkpoint = sharded / "checkpoint-2"
    assert {"optimizer.bin", "pytorch_model_fsdp.bin", "checkpoint_complete.json"} <= set(os.listdir(checkpoint))

    # The final model is a plain transformers checkpoint, loaded in one process, its tied weights still tied.
    saved = load_file(os.path.join(sharded, "model.safetensors"))
    if script == "run_clm":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(sharded)
        assert model.lm_head.weight is model.transformer.wte.weight
        torch.testing.assert_close(saved["lm_head.weight"], saved["transformer.wte.weight"], rtol=0, atol=0)
    else:
        from transformers import BertForPreTraining

        model = BertForPreTraining.from_pretrained(sharded)
        assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
        torch.testing.assert_close(model.cls.predictions.decoder.bias, saved["cls.predictions.bias"], rtol=0, atol=0)
        assert model.cls.predictions.bias.abs().sum() > 0  # trained, not a fresh zero bias

    # A crash right after checkpoint-2: the same command resumes from it.
    crashed.mkdir()
    shutil.copytree(checkpoint, crashed / "checkpoint-2")
    result = run(command(script, data, crashed, 2, "--fsdp", "full_shard"))
    assert "Resuming from" in result.stderr + result.stdout
    assert read_json(crashed / "trainer_state.json")["global_step"] == 4
    assert largest_relative_difference(reference, crashed) <= 1e-4


@pytest.mark.slow
def test_float16_with_offloaded_shards_on_a_modelled_v100(assets, masked_pairs, tmp_path):
    """The seed config's optimizer_state_offchip on a (modelled) V100 under --fsdp: float16 autocast with the static
    loss scale, the shards and the update in host memory (CPUOffloadPolicy). The scaler's overflow check on sharded
    gradients is torch's (its DTensor handler takes the maximum over the shards, so every process skips alike)."""
    flags = command("run_pretraining", (assets, masked_pairs), tmp_path, 2, "--fsdp", "full_shard",
                    "--device_model", "V100", "--loss_scaling", "1024", "--save_strategy", "no", "--logging_steps", "1")
    flags.remove("--fp32")
    log = run(flags)
    output = log.stderr + log.stdout
    assert "CPU run modelling an NVIDIA V100" in output and "float16" in output
    assert "host memory (CPUOffloadPolicy)" in output
    losses = [entry["loss"] for entry in read_json(tmp_path / "trainer_state.json")["log_history"] if "loss" in entry]
    assert len(losses) == 4 and all(map(math.isfinite, losses))
    assert all(torch.isfinite(weights).all() for weights in load_file(tmp_path / "model.safetensors").values())


# ---- decisions and refusals, without processes --------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    (dict(fsdp="hybrid_shard"), "--fsdp hybrid_shard is not supported"),
    (dict(fsdp="full_shard", fsdp_config={"version": 1}), "version=1 is not supported"),
    (dict(fsdp="full_shard", fsdp_config={"state_dict_type": "SHARDED_STATE_DICT"}), "SHARDED_STATE_DICT"),
    (dict(fsdp="full_shard", deepspeed="ds.json"), "--deepspeed is not supported"),
])
def test_combinations_fsdp_cannot_run_are_refused_by_flag(tmp_path, values, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **values)


def test_one_process_has_nothing_to_shard_over():
    with pytest.raises(ValueError, match="torchrun --nproc_per_node N"):
        check_fsdp_processes(1)
    check_fsdp_processes(2)


def test_reductions_are_float32_and_offload_is_the_ipu_configs():
    arguments = fsdp_plugin_arguments({"fsdp_version": 2}, torch.bfloat16, cpu_offload=True, layer_classes=["X"])
    policy = arguments["mixed_precision_policy"]
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert arguments["cpu_offload"].pin_memory and arguments["transformer_cls_names_to_wrap"] == "X"
    # A CPU run (modelling a GPU or not) has no pinned memory: torch refuses to pin without an accelerator.
    assert not fsdp_plugin_arguments({}, torch.float16, cpu_offload=True, pin_memory=False)["cpu_offload"].pin_memory
    given = fsdp_plugin_arguments({"transformer_cls_names_to_wrap": "Y"}, torch.float32, False, ["X"])
    assert given["transformer_cls_names_to_wrap"] == "Y" and given["mixed_precision_policy"].param_dtype is None


def test_layers_holding_tied_weights_are_not_units_of_their_own():
    from transformers import BertConfig, BertForPreTraining

    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32)
    model = BertForPreTraining(config)
    model._no_split_modules = ["BertEmbeddings", "BertLayer"]  # transformers 5's BERT; set for older ones too
    assert layers_to_wrap(model) == ["BertLayer"]  # the word embeddings are tied to the MLM decoder


def test_the_mlm_heads_second_bias_registration_joins_the_embeddings_unit():
    """BERT registers its MLM bias on the head and on the decoder: the whole head and the word embeddings are one
    unit. GPT-2 registers each weight once inside its embeddings: accelerate's own grouping is kept."""
    from transformers import BertConfig, GPT2Config, GPT2LMHeadModel

    from ipu_trainer.models import BertForPreTrainingMaskedPositions

    bert = BertForPreTrainingMaskedPositions(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                                        num_attention_heads=2, intermediate_size=32))
    group = output_embedding_group(bert)
    assert group is not None and len(group) == 2
    assert group[0] is bert.bert.embeddings.word_embeddings and group[1] is bert.cls.predictions
    assert output_embedding_group(GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2))) is None


def test_the_accelerate_attributes_shard_cpu_processes_sets_still_exist():
    """Fails by name when accelerate renames what run/fsdp.py's private touchpoint sets."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    assert DistributedType.FSDP and DistributedType.MULTI_CPU
    # The shared state that every later AcceleratorState copies its distributed_type from.
    assert isinstance(PartialState._shared_state, dict) and "distributed_type" in PartialState.__init__.__code__.co_names
    assert "_shared_state" in AcceleratorState.__init__.__code__.co_names
    assert isinstance(AcceleratorState.is_fsdp2, property)
    assert "fsdp_version" in FullyShardedDataParallelPlugin.__dataclass_fields__
