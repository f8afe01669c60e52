"""Throughput in the training log: samples/s, tokens/s and MFU per logging window, warm-up left out."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, default_data_collator

from ipu_trainer import IPUConfig, IPUTrainer, IPUTrainingArguments
from ipu_trainer.models import BertForPreTrainingMaskedPositions
from ipu_trainer.training import throughput as throughput_module
from ipu_trainer.training.mfu import transformer_training_flops_per_sequence
from ipu_trainer.run.device_model import device_model_named
from ipu_trainer.training.throughput import ThroughputMeter, device_peak_flops, training_flops_function
from tiny import SEQ, masked_pairs, tiny_bert

THROUGHPUT_KEYS = {"samples_per_second", "tokens_per_second"}


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make_trainer(tmp_path, eval_dataset=None, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, learning_rate=1e-3, max_steps=8, fp32=True,
        report_to=[], save_strategy="no", logging_steps=2, use_cpu=True, seed=0, disable_tqdm=True,
    )
    values.update(overrides)
    ipu_config = IPUConfig(layers_per_ipu=[-1], gradient_accumulation_steps=2)
    return IPUTrainer(model=tiny_bert(), ipu_config=ipu_config, args=IPUTrainingArguments(**values),
                      data_collator=default_data_collator, train_dataset=masked_pairs(64), eval_dataset=eval_dataset)


def timed_steps(monkeypatch, trainer, seconds_per_step):
    """Each training step takes `seconds_per_step` on the meter's clock."""
    clock = FakeClock()
    trainer.throughput.clock = clock
    original = IPUTrainer.training_step

    def step(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        clock.now += seconds_per_step
        return loss

    monkeypatch.setattr(IPUTrainer, "training_step", step)
    return clock


def training_lines(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_each_log_line_after_the_warm_up_has_the_rates_of_its_window(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    timed_steps(monkeypatch, trainer, seconds_per_step=0.5)
    trainer.train()

    lines = training_lines(trainer)
    assert [line["step"] for line in lines] == [2, 4, 6, 8]
    assert not THROUGHPUT_KEYS & set(lines[0])  # the first window is the warm-up
    samples_per_step = 4  # micro 2 x accumulation 2
    for line in lines[1:]:
        # samples per step x steps / elapsed, over the 2 steps of the window
        assert line["samples_per_second"] == pytest.approx(samples_per_step * 2 / (2 * 0.5))
        assert line["tokens_per_second"] == pytest.approx(line["samples_per_second"] * SEQ)  # no padding here
        assert "mfu" not in line  # a CPU has no datasheet peak
    # ... and they are in trainer_state.json's log history
    trainer.state.save_to_json(str(tmp_path / "state.json"))
    saved = [e for e in json.load(open(tmp_path / "state.json"))["log_history"] if "loss" in e]
    assert THROUGHPUT_KEYS <= set(saved[-1]) and saved[-1]["samples_per_second"] > 0
    # The end-of-training metrics keep upstream's keys (whole run, warm-up included) and get none of these.
    assert not THROUGHPUT_KEYS & set(trainer.state.log_history[-1])


def test_real_clock_rates_are_positive_and_agree_with_the_elapsed_time(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=6)
    trainer.train()
    lines = training_lines(trainer)
    assert all(THROUGHPUT_KEYS <= set(line) for line in lines[1:])
    window = trainer.throughput.last_window
    assert window.samples == 8 and window.tokens == 8 * SEQ and window.seconds > 0
    assert lines[-1]["samples_per_second"] == pytest.approx(window.samples / window.seconds)
    assert lines[-1]["tokens_per_second"] == pytest.approx(window.tokens / window.seconds)


def test_evaluation_and_checkpoints_inside_a_window_are_not_counted(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, logging_steps=4, eval_strategy="steps", eval_steps=3, save_strategy="steps",
                           save_steps=3, per_device_eval_batch_size=2, eval_dataset=masked_pairs(8))
    clock = timed_steps(monkeypatch, trainer, seconds_per_step=0.5)
    for name in ("evaluate", "_save_checkpoint"):
        original = getattr(IPUTrainer, name)

        def slow(self, *args, _original=original, **kwargs):
            clock.now += 100.0
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(IPUTrainer, name, slow)
    trainer.train()
    [first, second] = training_lines(trainer)  # steps 4 and 8; evaluation and a save at steps 3 and 6
    assert second["samples_per_second"] == pytest.approx(4 * 4 / (4 * 0.5))


def test_padding_tokens_are_not_counted_and_counting_does_not_sync():
    meter = ThroughputMeter(torch.device("cpu"), clock=FakeClock())
    mask = torch.zeros(4, 10, dtype=torch.long)
    mask[:, :6] = 1
    batch = {"input_ids": torch.ones(4, 10, dtype=torch.long), "attention_mask": mask}
    meter.window_metrics()  # the warm-up window ends
    with pytest.MonkeyPatch.context() as patch:
        # No value leaves the device while a batch is counted (a GPU would wait for it here).
        for method in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu"):
            patch.setattr(torch.Tensor, method, lambda *a, **k: pytest.fail("counting a batch synced the host"))
        meter.count_batch(batch)
        meter.count_batch(batch)
    meter.clock.now += 2.0
    metrics = meter.window_metrics()
    assert metrics == {"samples_per_second": 4.0, "tokens_per_second": 24.0}  # 8 rows, 48 tokens in 2 s
    meter.count_batch({"input_ids": torch.ones(2, 5, dtype=torch.long)})  # no mask: every token counts
    meter.clock.now += 1.0
    assert meter.window_metrics()["tokens_per_second"] == 10.0


def test_mfu_is_model_flops_over_the_peak(tmp_path, monkeypatch):
    monkeypatch.setattr(throughput_module, "device_peak_flops", lambda device, dtype, device_model=None: (2e9, "a test peak"))
    trainer = make_trainer(tmp_path)
    timed_steps(monkeypatch, trainer, seconds_per_step=0.5)
    trainer.train()
    per_sequence = transformer_training_flops_per_sequence(
        hidden_size=32, num_layers=2, intermediate_size=64, seq_len=SEQ, vocab_size=64)
    for line in training_lines(trainer)[1:]:
        assert line["mfu"] == pytest.approx(line["samples_per_second"] * per_sequence / 2e9)


def test_peak_of_a_known_cuda_gpu_and_none_elsewhere(monkeypatch):
    cuda = torch.device("cuda", 0)
    assert device_peak_flops(torch.device("cpu"), torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_peak_flops(cuda, torch.bfloat16)[0] == pytest.approx(989.4e12)
    assert not torch.backends.cuda.matmul.allow_tf32  # PyTorch's default: float32 against the plain FP32 rate
    assert device_peak_flops(cuda, torch.float32)[0] == pytest.approx(66.9e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert device_peak_flops(cuda, torch.bfloat16) is None


def test_a_device_model_is_measured_against_its_gpus_peak_under_its_own_key():
    """--device_model: the CPU's model FLOP/s over the modelled GPU's peak, logged as modelled_mfu, never as mfu."""
    cpu = torch.device("cpu")
    assert device_peak_flops(cpu, torch.float16, device_model_named("v100"))[0] == pytest.approx(125e12)
    assert device_peak_flops(cpu, torch.bfloat16, device_model_named("V100")) is None  # no bfloat16 tensor cores
    meter = ThroughputMeter.for_model(tiny_bert(), cpu, torch.bfloat16, device_model_named("A100"))
    assert meter.peak_flops == pytest.approx(312e12) and meter.mfu_key == "modelled_mfu"
    assert ThroughputMeter.for_model(tiny_bert(), cpu, torch.bfloat16).peak_flops is None


def test_a_meter_on_a_known_gpu_reports_mfu_and_on_a_cpu_does_not(monkeypatch):
    model = tiny_bert()
    assert ThroughputMeter.for_model(model, torch.device("cpu"), torch.float32).peak_flops is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    meter = ThroughputMeter.for_model(model, torch.device("cuda", 0), torch.bfloat16)
    assert meter.peak_flops == pytest.approx(312e12)
    meter.device = torch.device("cpu")  # the counters of this simulated GPU live on the CPU
    meter.clock = FakeClock()
    meter.window_metrics()
    meter.count_batch({"input_ids": torch.ones(8, SEQ, dtype=torch.long)})
    meter.clock.now += 2.0
    metrics = meter.window_metrics()
    expected = 8 * training_flops_function(model)(SEQ) / 2.0 / 312e12
    assert metrics["mfu"] == pytest.approx(expected)


def test_training_flops_follow_the_model_config():
    bert = tiny_bert()
    assert training_flops_function(bert)(SEQ) == transformer_training_flops_per_sequence(
        hidden_size=32, num_layers=2, intermediate_size=64, seq_len=SEQ, vocab_size=64)
    # The masked-position head projects onto the vocabulary at max_num_masked_tokens positions only.
    config = tiny_bert().config
    config.max_num_masked_tokens = 4
    masked = BertForPreTrainingMaskedPositions(config)
    assert training_flops_function(masked)(SEQ) == transformer_training_flops_per_sequence(
        hidden_size=32, num_layers=2, intermediate_size=64, seq_len=SEQ, vocab_size=64, logit_positions=4)
    # GPT-2 names its sizes n_embd / n_layer / n_inner (None: 4 x n_embd).
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=SEQ))
    assert training_flops_function(gpt2)(SEQ) == transformer_training_flops_per_sequence(
        hidden_size=32, num_layers=2, intermediate_size=128, seq_len=SEQ, vocab_size=64)
    assert training_flops_function(torch.nn.Linear(2, 2)) is None
