"""Conformance with the original's math: optimum-graphcore 0.7's trainer and poptorch's optimizers.

Every reference in this file is written out from the original's own formulas (its `trainer.py`, poptorch's
LAMB and AdamW as PopART computes them, transformers' initialisation), never from this package's code: the
package's optimizer, groups and schedule are only ever the thing checked. Each test names the original's
behaviour it pins; README's "differs on purpose" table lists what is deliberately not the original's.
"""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForPreTraining, BertConfig, GPT2Config
from transformers import default_data_collator, set_seed

from conftest import innermost_optimizer, quickstart_argv, run_script
from ipu_trainer import IPUConfig, IPUTrainer, IPUTrainingArguments
from ipu_trainer.cli.model_loading import load_model
from ipu_trainer.models import BertForPreTrainingMaskedPositions, GPT2LMHeadModelChunked
from tiny import masked_pairs, tiny_bert

# ---- the original's formulas ----------------------------------------------------------------------------------

POPTORCH_BETAS = (0.9, 0.999)  # what poptorch's LAMB uses when given no betas, as the original's LAMB was
FP16_MAX = 65500.0  # poptorch's max_weight_norm when given None (the original's optimizer-wide setting)


def original_parameter_settings(model: nn.Module, weight_decay: float, lamb: bool) -> dict[str, dict]:
    """Each parameter's (weight_decay, max_weight_norm) in the original's `create_optimizer`:
    decay_parameters = get_parameter_names(model, [nn.LayerNorm]) less the names containing "bias"; with LAMB the
    "bias" parameters get weight_decay 0.0 and max_weight_norm 0.0, the rest no decay; the optimizer-wide
    max_weight_norm is None (poptorch: 65500)."""

    def get_parameter_names(module, forbidden):  # transformers 4.29's helper, as the original called it
        result = []
        for name, child in module.named_children():
            result += [f"{name}.{n}" for n in get_parameter_names(child, forbidden) if not isinstance(child, forbidden)]
        return result + list(module._parameters.keys())

    decay = {n for n in get_parameter_names(model, (nn.LayerNorm,)) if "bias" not in n}
    settings = {}
    for name, _ in model.named_parameters():
        if name in decay:
            settings[name] = dict(weight_decay=weight_decay, max_weight_norm=FP16_MAX if lamb else None)
        elif lamb and "bias" in name:
            settings[name] = dict(weight_decay=0.0, max_weight_norm=0.0)
        else:
            settings[name] = dict(weight_decay=0.0, max_weight_norm=FP16_MAX if lamb else None)
    return settings


def poptorch_update(w, g, state, *, lr, betas, eps, weight_decay, bias_correction, lamb, max_weight_norm):
    """One PopART Adam / LAMB update of one parameter (float64), decay mode "Decay":
    m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; mc, vc = m / (1-b1^t), v / (1-b2^t) (or m, v);
    x = mc / (sqrt(vc) + eps) + wd w; AdamW: w - lr x; LAMB: w - min(||w||, mwn) / ||x|| lr x, ratio 1 at 0."""
    b1, b2 = betas
    state["t"] = t = state.get("t", 0) + 1
    state["m"] = b1 * state.get("m", torch.zeros_like(w)) + (1 - b1) * g
    state["v"] = b2 * state.get("v", torch.zeros_like(w)) + (1 - b2) * g * g
    mc, vc = (state["m"] / (1 - b1**t), state["v"] / (1 - b2**t)) if bias_correction else (state["m"], state["v"])
    x = mc / (vc.sqrt() + eps) + weight_decay * w
    trust = 1.0
    if lamb:
        r1 = w.norm().item()
        if max_weight_norm is not None:
            r1 = min(r1, max_weight_norm)
        r2 = x.norm().item()
        trust = r1 / r2 if r1 > 0 and r2 > 0 else 1.0
    return w - lr * trust * x


def original_linear_lr(step: int, lr: float, warmup: int, total: int) -> float:
    """transformers' linear schedule, which the original's default --lr_scheduler_type built."""
    if step < warmup:
        return lr * step / max(1, warmup)
    return lr * max(0.0, (total - step) / max(1, total - warmup))


# ---- helpers -------------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "adamw": dict(),  # no optimizer flag: the original's AdamW, bias_correction=False
    "lamb": dict(lamb=True),
    "lamb_no_bias_correction": dict(lamb_no_bias_correction=True),
}


def flags_of(optimizer: str) -> dict:
    flags = OPTIMIZERS[optimizer]
    return dict(lamb=bool(flags), bias_correction=not flags.get("lamb_no_bias_correction", False) if flags else False)


def make_args(tmp_path, **overrides) -> IPUTrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, per_device_eval_batch_size=2,
        learning_rate=2e-3, weight_decay=0.1, adam_epsilon=1e-6, max_steps=4, fp32=True, report_to=[],
        save_strategy="no", logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True,
    )
    values.update(overrides)
    return IPUTrainingArguments(**values)


def bert_with_nonzero_biases() -> nn.Module:
    """A tiny BERT whose biases are not zero, so a trust ratio applied to them would show (||b|| = 0 gives 1), and
    whose word embeddings have a norm above 65500, where poptorch's LAMB clamps ||w||."""
    model = tiny_bert()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bias" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        model.bert.embeddings.word_embeddings.weight.mul_(1e5)
    assert model.bert.embeddings.word_embeddings.weight.norm() > 1.2 * FP16_MAX
    return model


def make_trainer(tmp_path, model, dataset=None, ipu_values=None, **arg_overrides) -> IPUTrainer:
    return IPUTrainer(model=model, ipu_config=IPUConfig(layers_per_ipu=[-1], **(ipu_values or {})),
                      args=make_args(tmp_path, **arg_overrides), data_collator=default_data_collator,
                      train_dataset=dataset if dataset is not None else masked_pairs(32))


class UpdateRecorder:
    """At every weight update: each parameter's gradient (as the optimizer receives it) and learning rate."""

    def __init__(self, trainer: IPUTrainer):
        self.updates = []
        self.optimizer = innermost_optimizer(trainer.optimizer)
        self.names = {id(p): n for n, p in trainer.model.named_parameters()}
        self.optimizer.register_step_pre_hook(self._record)

    def _record(self, optimizer, args, kwargs):
        update = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                grad = None if p.grad is None else p.grad.detach().double().clone()
                update[self.names[id(p)]] = dict(grad=grad, lr=group["lr"])
        self.updates.append(update)


def replay(initial: dict, updates: list, settings: dict, **optimizer) -> dict:
    """The original's weights after `updates`, from `initial` (float64)."""
    weights = {n: w.double().clone() for n, w in initial.items()}
    states = {n: {} for n in weights}
    for update in updates:
        for name, seen in update.items():
            if seen["grad"] is not None:
                weights[name] = poptorch_update(weights[name], seen["grad"], states[name], lr=seen["lr"],
                                                **settings[name], **optimizer)
    return weights


# ---- 1. the optimizer: groups and update rule ----------------------------------------------------------------


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_one_update_on_fixed_gradients_is_the_originals(tmp_path, optimizer):
    """One update of the trainer's own optimizer, on fixed gradients, against poptorch's formula with the
    original's parameter groups (LAMB: biases without trust ratio; AdamW: no bias correction)."""
    model = bert_with_nonzero_biases()
    trainer = make_trainer(tmp_path, model, **OPTIMIZERS[optimizer])
    trainer.create_optimizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(5)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
    grads = {n: p.grad.double().clone() for n, p in model.named_parameters()}
    trainer.optimizer.step()

    settings = original_parameter_settings(model, weight_decay=0.1, lamb=flags_of(optimizer)["lamb"])
    update = [{n: dict(grad=grads[n], lr=2e-3) for n in grads}]
    expected = replay(before, update, settings, betas=POPTORCH_BETAS, eps=1e-6, **flags_of(optimizer))
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach().double(), expected[name], rtol=1e-5, atol=1e-7, msg=name)
    # The point of the bias group: a bias moves by a plain Adam step, lr * (m / (sqrt(v) + eps)) with m, v from one
    # gradient, whatever its own norm (with LAMB's trust ratio ||b|| / ||x|| it would move far less).
    bias = "bert.encoder.layer.0.attention.self.query.bias"
    moved = (model.get_parameter(bias).detach().double() - before[bias].double()).abs().max().item()
    first_step = 2e-3 * (1.0 if flags_of(optimizer)["bias_correction"] else 0.1 / math.sqrt(0.001))
    assert moved == pytest.approx(first_step, rel=1e-3)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_a_real_training_run_follows_the_originals_update_rule(tmp_path, optimizer):
    """A from-scratch run of 4 steps with a warmup and weight decay: every update of every parameter group, from the
    initial weights to the last, is the original's (groups, update rule, schedule), replayed from the gradients
    the optimizer was handed."""
    set_seed(3)
    model = AutoModelForPreTraining.from_config(tiny_bert().config)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(tmp_path, model, lr_scheduler_type="linear", warmup_ratio=0.3,
                           ipu_values=dict(gradient_accumulation_steps=2), **OPTIMIZERS[optimizer])
    trainer.create_optimizer()
    recorder = UpdateRecorder(trainer)
    trainer.train()

    assert len(recorder.updates) == 4
    warmup = math.ceil(4 * 0.3)
    for step, update in enumerate(recorder.updates):
        expected_lr = original_linear_lr(step, 2e-3, warmup, 4)
        assert [seen["lr"] for seen in update.values()] == pytest.approx([expected_lr] * len(update))
    settings = original_parameter_settings(model, weight_decay=0.1, lamb=flags_of(optimizer)["lamb"])
    expected = replay(initial, recorder.updates, settings, betas=POPTORCH_BETAS, eps=1e-6, **flags_of(optimizer))
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach().double(), expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_no_gradient_clipping_by_default(tmp_path):
    """The original never clipped (its AdamW's max_grad_norm is commented out, LAMB gets none): the optimizer is
    handed the gradient of the update's micro-batches as computed, even with a norm far above 1."""
    model = tiny_bert()
    reference = copy.deepcopy(model)
    # One micro-batch of the whole dataset: its loss, a mean over its tokens, does not depend on the sample order.
    trainer = make_trainer(tmp_path, model, max_steps=1, dataset=masked_pairs(4), per_device_train_batch_size=4)
    trainer.create_optimizer()
    recorder = UpdateRecorder(trainer)
    trainer.train()
    reference.train()
    reference(**default_data_collator(list(masked_pairs(4)))).loss.backward()
    grads = {n: p.grad.double() for n, p in reference.named_parameters()}
    norm = torch.cat([g.flatten() for g in grads.values()]).norm().item()
    assert norm > 2, "the test needs gradients that clipping at 1.0 would change"
    (update,) = recorder.updates
    for name, grad in grads.items():
        torch.testing.assert_close(update[name]["grad"], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_an_explicit_max_grad_norm_is_honoured_and_logged(tmp_path, caplog):
    trainer = make_trainer(tmp_path, tiny_bert(), max_steps=1, max_grad_norm=0.5)
    assert "--max_grad_norm 0.5 (the original never clipped gradients)" in caplog.text
    trainer.create_optimizer()
    recorder = UpdateRecorder(trainer)
    trainer.train()
    (update,) = recorder.updates
    norm = torch.cat([seen["grad"].flatten() for seen in update.values() if seen["grad"] is not None]).norm().item()
    assert norm == pytest.approx(0.5, rel=1e-4)


def test_an_explicit_optim_is_honoured_and_logged_as_a_departure(tmp_path, caplog):
    trainer = make_trainer(tmp_path, tiny_bert(), optim="adamw_torch")
    trainer.create_optimizer()
    assert type(innermost_optimizer(trainer.optimizer)) is torch.optim.AdamW
    assert "--optim adamw_torch (the original always used" in caplog.text
    with pytest.raises(ValueError, match="--lamb and --optim sgd both choose the optimizer"):
        make_args(tmp_path, lamb=True, optim="sgd")


# ---- 2. initial weights --------------------------------------------------------------------------------------


@pytest.mark.parametrize("script, auto_class", [
    ("run_pretraining", AutoModelForPreTraining), ("run_mlm", AutoModelForMaskedLM), ("run_clm", AutoModelForCausalLM),
])
def test_from_scratch_weights_are_from_config_after_set_seed(monkeypatch, tmp_path, assets, script, auto_class):
    """The original built `AutoModelFor*.from_config(config)` after `set_seed(--seed)` and trained a copy of its
    state: the script's model (whatever class it uses for speed) starts from those weights, bit for bit."""
    captured = {}

    class Captured(Exception):
        pass

    def capture(trainer, model):
        captured["config"], captured["state"] = copy.deepcopy(model.config), copy.deepcopy(model.state_dict())
        raise Captured

    monkeypatch.setattr(IPUTrainer, "_prepare_model", capture)
    with pytest.raises(Captured):
        run_script(monkeypatch, quickstart_argv(script, assets, tmp_path / "out", "--seed", "11"))
    set_seed(11)
    expected = auto_class.from_config(captured["config"]).state_dict()
    assert captured["state"].keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(captured["state"][name], tensor), name


def test_a_fresh_model_is_seeded_right_before_it_is_built(tokenizer):
    """Whatever drew from torch's generator since the script seeded it, the fresh model is the one from_config
    builds right after set_seed(--seed)."""
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    scratch = SimpleNamespace(model_name_or_path=None)
    set_seed(11)
    torch.rand(100)  # e.g. data preparation between the script's set_seed and the model
    model = load_model(AutoModelForPreTraining, scratch, config, tokenizer,
                       model_class=BertForPreTrainingMaskedPositions, seed=11)
    set_seed(11)
    expected = AutoModelForPreTraining.from_config(config).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


# ---- 3. batches and schedule ---------------------------------------------------------------------------------


def test_the_last_incomplete_training_batch_is_dropped_and_evaluation_keeps_it(tmp_path):
    """`poptorch.DataLoader` drops the last incomplete batch in training (drop_last=True by default); evaluation
    used --dataloader_drop_last (False): 10 samples in batches of 4 are 2 training steps an epoch, all 10 evaluated."""
    trainer = make_trainer(tmp_path, tiny_bert(), dataset=masked_pairs(10), max_steps=-1, num_train_epochs=1,
                           per_device_train_batch_size=4, per_device_eval_batch_size=4)
    assert trainer.train().global_step == 2
    assert sum(len(b["input_ids"]) for b in trainer.get_eval_dataloader(masked_pairs(10))) == 10
    kept = make_trainer(tmp_path, tiny_bert(), dataset=masked_pairs(10), max_steps=-1, num_train_epochs=1,
                        per_device_train_batch_size=4, dataloader_drop_last=False)
    assert kept.train().global_step == 3


def test_the_phase_1_recipe_warms_up_over_the_originals_step_count(tmp_path):
    """BERT phase 1: 10500 steps, --warmup_ratio 0.28. The original: math.ceil(10500 * 0.28) = 2941 (the product is
    2940.0000000000005 in floating point); the learning rate peaks at that step, not one before."""
    assert math.ceil(10500 * 0.28) == 2941
    trainer = make_trainer(tmp_path, tiny_bert(), max_steps=10500, warmup_ratio=0.28, lr_scheduler_type="linear")
    trainer.create_optimizer()
    scheduler = trainer.create_scheduler(num_training_steps=10500)
    multipliers = [scheduler.lr_lambdas[0](step) for step in (2940, 2941)]
    assert multipliers == [pytest.approx(2940 / 2941), 1.0]


# ---- 4. losses -------------------------------------------------------------------------------------------------


def labelled_batch(vocab: int, rows: int = 4, length: int = 16, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (rows, length), generator=generator)
    labels = torch.where(torch.rand(rows, length, generator=generator) < 0.2, input_ids, torch.full_like(input_ids, -100))
    labels[:, 1] = input_ids[:, 1]  # every row has a label
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)


@pytest.mark.parametrize("ipu_values", [dict(), dict(embedding_serialization_factor=4)], ids=["one-piece", "chunked"])
def test_the_pretraining_loss_is_masked_lm_mean_plus_next_sentence_mean(ipu_values):
    """The original's loss: F.cross_entropy over the (at most max_num_masked_tokens) labelled positions, a mean,
    plus F.cross_entropy of the next-sentence head, a mean over the sequences; the same number whichever of the
    package's heads (masked positions only, chunked projection) computes it."""
    config = tiny_bert().config
    config.max_num_masked_tokens = 8
    set_seed(0)
    upstream = AutoModelForPreTraining.from_config(config)
    model = BertForPreTrainingMaskedPositions(config)
    model.load_state_dict(upstream.state_dict())
    model.parallelize(IPUConfig(layers_per_ipu=[-1], **ipu_values))
    batch = labelled_batch(config.vocab_size)
    batch["next_sentence_label"] = torch.tensor([0, 1, 1, 0])
    upstream.eval()
    with torch.no_grad():
        outputs = upstream(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = (F.cross_entropy(outputs.prediction_logits.reshape(-1, config.vocab_size), batch["labels"].reshape(-1))
                + F.cross_entropy(outputs.seq_relationship_logits, batch["next_sentence_label"]))
    model.train()
    torch.testing.assert_close(model(**batch).loss, expected, rtol=1e-5, atol=1e-6)


def test_the_causal_lm_loss_is_the_mean_next_token_cross_entropy():
    """run_clm: the prediction at position t is scored against the token at t + 1, a mean over the positions."""
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModelChunked(config)
    model.parallelize(IPUConfig(layers_per_ipu=[-1], embedding_serialization_factor=4))
    input_ids = labelled_batch(64)["input_ids"]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 64), input_ids[:, 1:].reshape(-1))
    model.train()
    torch.testing.assert_close(model(input_ids=input_ids, labels=input_ids).loss, expected, rtol=1e-5, atol=1e-6)


def test_a_nan_loss_shows_in_the_log_as_in_the_original(tmp_path):
    """The original's training arguments default logging_nan_inf_filter to False (transformers' to True): a NaN
    training loss is logged as NaN, not replaced by the window's average."""
    model = tiny_bert()
    with torch.no_grad():
        model.cls.seq_relationship.bias.fill_(float("nan"))
    trainer = make_trainer(tmp_path, model, max_steps=2)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isnan(loss) for loss in losses)
