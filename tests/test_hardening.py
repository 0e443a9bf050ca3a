"""Inputs that used to go wrong silently: a perturbed pass that overflows, settings given twice,
numbers written as text in YAML files."""

import math

import pytest
import torch
import yaml
from transformers import HfArgumentParser

import tiny
from hf_sam import SAMConfig, SAMTrainer, SAMTrainingArguments
from test_reference import Tokens, tiny_gpt2


def test_huge_rho_never_puts_nan_into_the_weights(tmp_path):
    # rho = 1e9 on a tiny GPT-2, clipping on: the clean pass is finite, the pass at w + e is not.
    model = tiny_gpt2()
    tr = tiny.trainer(tmp_path, model, Tokens(), sam_config=SAMConfig(rho=1e9), max_steps=3,
                      per_device_train_batch_size=4, max_grad_norm=1.0, learning_rate=1e-3, optim="adamw_torch")
    seen = []
    orig = tr._sam_run_pass

    def recording(*a, **k):
        loss = orig(*a, **k)
        seen.append(loss.item())
        return loss

    tr._sam_run_pass = recording
    tr.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    clean, perturbed = seen[0::2], seen[1::2]
    assert all(math.isfinite(x) for x in clean)
    assert all(not math.isfinite(x) for x in perturbed)  # the case the guard exists for
    logged = [h for h in tr.state.log_history if "sam/skipped" in h]
    assert sum(h["sam/skipped"] for h in logged) == 3  # one dropped micro-batch per step, each counted


def test_dropped_descent_leaves_earlier_micro_batches_and_adds_nothing(tmp_path):
    # GA 2: the first micro-batch is normal, the second's perturbed pass is poisoned. The window's
    # gradient must be exactly the first micro-batch's descent gradient (the second adds nothing).
    model = tiny.MLP()
    tr = tiny.trainer(tmp_path, model, sam_config=SAMConfig(rho=0.1), max_steps=1, gradient_accumulation_steps=2)
    calls = {"n": 0}
    orig = tr._sam_run_pass

    def poisoned(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # micro-batch 2, pass at w + e
            handle = model.fc1.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
            try:
                return orig(*a, **k)
            finally:
                handle.remove()
        return orig(*a, **k)

    tr._sam_run_pass = poisoned
    grads = {}
    tr.add_callback(_GradGrabber(model, grads))
    before = tiny.params_copy(model)
    tr.train()
    # reference: only micro-batch 1's SAM descent gradient, scaled by 1/GA
    window = tiny.windows(tiny.Blobs(), 4, 2, 1)[0]
    ref = tiny.MLP()
    ref.load_state_dict({k: v for k, v in before.items()})
    params = list(ref.parameters())
    mb = window[0]
    g = torch.autograd.grad(ref(**mb)["loss"] / 2, params)
    norm = torch.sqrt(sum((x ** 2).sum() for x in g))
    with torch.no_grad():
        for p, x in zip(params, g):
            p.add_(0.1 * x / (norm + 1e-12))
    expected = torch.autograd.grad(ref(**mb)["loss"] / 2, params)
    for (name, _), e in zip(ref.named_parameters(), expected):
        torch.testing.assert_close(grads[name], e, atol=1e-7, rtol=0)
    assert tr.state.log_history[0]["sam/skipped"] == 1


class _GradGrabber:
    """A callback that copies the gradients just before the optimizer step."""

    def __init__(self, model, out):
        self.model, self.out = model, out

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for n, p in self.model.named_parameters():
            self.out[n] = p.grad.detach().clone()


def test_nan_in_the_clean_pass_stays_the_trainers_business(tmp_path):
    # A clean pass that is already non-finite is not dropped: .grad is what a stock step would hold.
    model = tiny.MLP()
    tr = tiny.trainer(tmp_path, model, sam_config=SAMConfig(rho=0.1), max_steps=1)
    tr.create_optimizer()
    handle = model.fc1.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    inputs = tiny.windows(tiny.Blobs(), 4, 1, 1)[0][0]
    tr.current_gradient_accumulation_steps = 1
    tr.training_step(model, inputs)
    handle.remove()
    assert torch.isnan(model.fc1.weight.grad).all()


def test_config_and_arguments_together_is_an_error(tmp_path):
    args = tiny.args(tmp_path, sam_rho=0.2, sam_variant="asam")
    with pytest.raises(ValueError) as err:
        SAMTrainer(model=tiny.MLP(), args=args, sam_config=SAMConfig(rho=0.7))
    assert "sam_rho=0.2" in str(err.value) and "sam_variant='asam'" in str(err.value)
    assert "sam_config" in str(err.value)


def test_yaml_numbers_written_as_text_become_numbers(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: out\nlearning_rate: 1e-3\nsam_rho: 1e-2\nsam_eps: 1e-10\nsam_interval: '3'\n")
    assert isinstance(yaml.safe_load(path.read_text())["sam_rho"], str)  # what PyYAML does
    (args,) = HfArgumentParser(SAMTrainingArguments).parse_yaml_file(str(path))
    assert args.sam_rho == 0.01 and isinstance(args.sam_rho, float)
    assert args.sam_eps == 1e-10 and args.sam_interval == 3
    assert args.sam_config.rho == 0.01
    assert args.learning_rate == 1e-3 and isinstance(args.learning_rate, float)  # the host's fields too
    path.write_text("output_dir: out\nwarmup_steps: many\n")
    with pytest.raises(ValueError, match=r"warmup_steps='many' is not a number; warmup_steps takes"):
        HfArgumentParser(SAMTrainingArguments).parse_yaml_file(str(path))


def test_text_that_is_not_a_number_names_the_setting_and_type():
    with pytest.raises(ValueError, match=r"rho='abc' is not a number; rho takes a number"):
        SAMConfig(rho="abc")
    with pytest.raises(ValueError, match=r"interval='2.5' is not a number; interval takes an integer"):
        SAMConfig(interval="2.5")


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"sam_rho=-1\.0 is out of range"):
        SAMTrainingArguments(output_dir="out", sam_rho=-1.0)
    with pytest.raises(ValueError, match=r"sam_gsam_alpha is a setting of variant 'gsam'"):
        SAMTrainingArguments(output_dir="out", sam_gsam_alpha=0.2)
