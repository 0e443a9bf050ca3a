"""Every front-end computes plain SAM, whatever loop drives it.

Reference: test_reference.reference_run, SAM written in plain torch from the paper's equations
    g = grad L(w);  e = rho * g / (||g|| + eps);  d = grad L(w + e)  (summed over a window);
    optional clip of d by its global norm;  base step (SGD / AdamW) at w with d.
Front-ends checked against it:
- hf_sam.SAM with a closure that clears the gradients itself (torch.optim's documented closure,
  PyTorch Lightning's automatic optimization) or not, and gradient accumulation;
- hf_sam.SAM under accelerate (the loss and metrics through the prepared optimizer);
- the Trainer front-end on a host that generates its batch in `_prepare_inputs` (TRL's GRPO): one
  batch and one reward evaluation per micro-batch, replayed with plain SAM on the recorded batches;
- float64 models in both front-ends.
"""

import copy

import pytest
import torch

import tiny
from hf_sam import SAM, SAMConfig, with_sam
from test_reference import max_deviation, reference_run

RHO = 0.1


def windows(n_steps, ga=1, dtype=torch.float32):
    out = tiny.windows(tiny.Blobs(n=64), 4, ga, n_steps)
    return [[{k: v.to(dtype) if v.is_floating_point() else v for k, v in mb.items()} for mb in w] for w in out]


def make_sam(model, opt_name, lr, rho=RHO, **kw):
    if opt_name == "sgd":
        return SAM(model.named_parameters(), torch.optim.SGD, config=SAMConfig(rho=rho, **kw), lr=lr)
    return SAM(model.named_parameters(), torch.optim.AdamW, config=SAMConfig(rho=rho, **kw), lr=lr,
               weight_decay=0.0)


def closure_loop(model, wins, opt_name, lr, style, **config):
    """The loops a user writes around hf_sam.SAM; `style` says where the gradients are cleared."""
    opt = make_sam(model, opt_name, lr, **config)
    for window in wins:
        for k, mb in enumerate(window):
            def closure(mb=mb):
                if style in ("zero_inside", "ga_zero_inside"):
                    opt.zero_grad()
                loss = model(**mb)["loss"] / len(window)
                loss.backward()
                return loss

            last = k == len(window) - 1
            if style == "ga_accumulate":
                opt.accumulate(closure)
                if last:
                    opt.step()
            elif last:
                loss = opt.step(closure)
                with torch.no_grad():  # the returned loss is L(w) of this micro-batch
                    assert torch.is_tensor(loss)
            else:
                opt.accumulate(closure)
        if style in ("zero_after", "ga_accumulate", "ga_step_last"):
            opt.zero_grad()
    return opt


@pytest.mark.parametrize("opt_name,lr", [("sgd", 0.1), ("adamw", 1e-2)])
@pytest.mark.parametrize("style,ga", [("zero_inside", 1), ("zero_after", 1), ("never_zeroed", 1),
                                      ("ga_accumulate", 2), ("ga_step_last", 2), ("ga_zero_inside", 2)])
def test_closure_styles_match_plain_sam(opt_name, lr, style, ga):
    model = tiny.MLP()
    init = copy.deepcopy(model)
    wins = windows(4, ga)
    closure_loop(model, wins, opt_name, lr, style)
    assert max_deviation(model, reference_run(init, wins, opt_name, lr, RHO)) <= 1e-6


def test_a_backward_outside_the_optimizer_is_refused_before_any_pass():
    model = tiny.MLP()
    opt = make_sam(model, "sgd", 0.1)
    (mb,) = windows(1)[0]
    model(**mb)["loss"].backward()  # e.g. Lightning's accumulate_grad_batches: outside opt.step
    before = tiny.params_copy(model)
    calls = []

    def closure():
        calls.append(1)
        loss = model(**mb)["loss"]
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="outside the optimizer.*opt.accumulate"):
        opt.step(closure)
    assert not calls and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    opt.zero_grad()
    opt.step(closure)  # after zero_grad the step runs
    assert len(calls) == 2


# ---- PyTorch Lightning, automatic optimization ------------------------------------------------------
def lightning_fit(model, wins, lr, **trainer_kw):
    lightning = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, batch_idx):
            return self.net(**batch)["loss"]

        def configure_optimizers(self):
            return make_sam(self.net, "adamw", lr)

    data = [mb for window in wins for mb in window]
    loader = DataLoader(data, batch_size=None, shuffle=False)
    trainer = lightning.Trainer(accelerator="cpu", devices=1, max_steps=len(wins), logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0, **trainer_kw)
    module = Module()
    trainer.fit(module, loader)
    return trainer


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_lightning_automatic_optimization_is_plain_sam(clip):
    model = tiny.MLP()
    init = copy.deepcopy(model)
    wins = windows(4)
    trainer = lightning_fit(model, wins, 1e-2, gradient_clip_val=clip or None)
    ref = reference_run(init, wins, "adamw", 1e-2, RHO, clip=clip)
    assert max_deviation(model, ref) <= 1e-6
    sam = SAM.unwrap(trainer.optimizers[0])
    assert sam.steps == 4 and sam.metrics()["sam/perturbation_norm"] == pytest.approx(RHO, rel=1e-5)


def test_lightning_gradient_accumulation_is_refused():
    wins = windows(2, ga=2)
    with pytest.raises(RuntimeError, match="accumulate_grad_batches"):
        lightning_fit(tiny.MLP(), wins, 1e-2, accumulate_grad_batches=2)


# ---- accelerate ------------------------------------------------------------------------------------
def test_accelerate_loss_and_metrics_through_the_prepared_optimizer():
    from accelerate import Accelerator

    model = tiny.MLP()
    init = copy.deepcopy(model)
    accelerator = Accelerator(cpu=True)
    opt = make_sam(model, "sgd", 0.1)
    model, opt = accelerator.prepare(model, opt)
    sam = SAM.unwrap(opt)
    assert isinstance(sam, SAM) and sam is not opt
    wins = windows(3)
    for k, (mb,) in enumerate(wins):
        def closure(mb=mb):
            opt.zero_grad()
            loss = model(**mb)["loss"]
            accelerator.backward(loss)
            return loss

        with torch.no_grad():
            clean = model(**mb)["loss"]
        if k % 2 == 0:
            opt.step(closure)  # the prepared optimizer (its step returns None): read sam.last_loss
            loss = sam.last_loss
        else:
            loss = sam.step(closure)  # the unwrapped optimizer's step returns the loss
        assert torch.equal(loss, clean)
    assert sam.metrics()["sam/perturbation_norm"] == pytest.approx(RHO, rel=1e-5)
    assert max_deviation(accelerator.unwrap_model(model), reference_run(init, wins, "sgd", 0.1, RHO)) <= 1e-6
    with pytest.raises(TypeError, match="does not wrap a hf_sam.SAM"):
        SAM.unwrap(torch.optim.SGD(init.parameters(), lr=0.1))


# ---- float64 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("adaptive", [False, True])
def test_float64_closure_matches_a_float64_reference(adaptive):
    model = tiny.MLP().double()
    init = copy.deepcopy(model)
    wins = windows(3, dtype=torch.float64)
    closure_loop(model, wins, "sgd", 0.1, "zero_after", rho=0.5, adaptive=adaptive)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert max_deviation(model, reference_run(init, wins, "sgd", 0.1, 0.5, adaptive=adaptive)) <= 1e-12


class Blobs64(tiny.Blobs):
    def __getitem__(self, i):
        item = super().__getitem__(i)
        return dict(item, x=item["x"].double())


def test_float64_samtrainer_matches_a_float64_reference(tmp_path):
    model = tiny.MLP().double()
    init = copy.deepcopy(model)
    tr = tiny.trainer(tmp_path, model, dataset=Blobs64(), sam_config=SAMConfig(rho=0.5), max_steps=3)
    tr.train()
    wins = tiny.windows(Blobs64(), 4, 1, 3)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert max_deviation(model, reference_run(init, wins, "sgd", 0.1, 0.5)) <= 1e-12


# ---- hosts that generate their batch in _prepare_inputs: TRL's GRPO and RLOO --------------------------
def rl_hosts(name):
    trl = pytest.importorskip("trl")
    return {"grpo": (trl.GRPOTrainer, trl.GRPOConfig), "rloo": (trl.RLOOTrainer, trl.RLOOConfig)}[name]


def grpo_run(tmp_path, sam, record=None, steps_per_generation=1, max_steps=2, host="grpo"):
    """A tiny GRPO (or RLOO) run; returns (trainer, reward calls, initial model). `record` gets the prepared batches."""
    from datasets import Dataset as HFDataset

    from test_trainers import TRL_PLAIN, gpt2, tokenizer

    host_cls, config_cls = rl_hosts(host)

    calls = []

    def reward(completions, **kwargs):  # deterministic; differs within every group, so advantages are not 0
        calls.append(len(completions))
        return [float(i % 2) + 0.1 * len(c) for i, c in enumerate(completions)]

    cls = host_cls
    if sam:
        class Recording(with_sam(host_cls)):
            def _prepare_inputs(self, inputs):
                batch = super()._prepare_inputs(inputs)
                if record is not None and self.model.training:
                    record.append((self.state.global_step, batch))
                return batch

        cls = Recording
    model = gpt2()
    init = copy.deepcopy(model)
    config = config_cls(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                        max_completion_length=3, max_steps=max_steps, learning_rate=0.5, beta=0.0,
                        steps_per_generation=steps_per_generation, **TRL_PLAIN)
    data = HFDataset.from_dict({"prompt": ["the cat", "a dog", "the bird", "we train"] * 4})
    kw = dict(sam_config=SAMConfig(rho=RHO)) if sam else {}
    tr = cls(model=model, reward_funcs=reward, args=config, train_dataset=data, processing_class=tokenizer(), **kw)
    tr.train()
    return tr, calls, init


@pytest.mark.parametrize("host,steps_per_generation", [("grpo", 1), ("grpo", 2), ("rloo", 2)])
def test_grpo_and_rloo_one_batch_and_one_reward_evaluation_per_micro_batch(tmp_path, host, steps_per_generation):
    host_cls, _ = rl_hosts(host)
    _, stock_calls, _ = grpo_run(tmp_path / "stock", sam=False, steps_per_generation=steps_per_generation, host=host)
    record = []
    tr, calls, init = grpo_run(tmp_path / "sam", sam=True, record=record, steps_per_generation=steps_per_generation,
                               host=host)
    assert calls == stock_calls  # as many reward evaluations (of as many completions) as the stock trainer
    assert [s for s, _ in record] == [0, 0, 1, 1]  # two passes per step, both inside the step
    for (_, first), (_, second) in (record[:2], record[2:]):  # the same batch (the same tensors) in both passes
        assert first.keys() == second.keys() and all(first[k] is second[k] for k in first)
    assert any(not torch.equal(record[0][1][k], record[2][1][k]) for k in ("prompt_ids", "completion_ids"))
    # plain SAM replayed on the recorded batches, with the host's own GRPO loss: same weights
    batches = [[record[0][1]], [record[2][1]]]
    start = copy.deepcopy(tr.model)  # the model as GRPO set it up (its fused log-prob head), at the initial weights
    start.load_state_dict(init.state_dict())
    ref = reference_run(start, batches, "sgd", 0.5, RHO,
                        loss_fn=lambda m, mb, window: host_cls.compute_loss(tr, m, mb))
    moved = max_deviation(tr.model, dict(init.named_parameters()))
    print(f"{host}: moved {moved:.3g}, deviation from the replay {max_deviation(tr.model, ref):.3g}")
    assert moved > 1e-3 and max_deviation(tr.model, ref) <= 1e-6


def test_every_pass_gets_the_whole_prepared_batch_when_a_pass_pops_keys(tmp_path):
    """The stock compute_loss pops `labels` from the prepared batch (compute_loss_func, label smoothing)."""
    import torch.nn.functional as F

    def loss_fn(outputs, labels, num_items_in_batch=None):
        return F.cross_entropy(outputs["logits"], labels, label_smoothing=0.1)

    model = tiny.MLP()
    init = copy.deepcopy(model)
    tr = tiny.InOrderSAMTrainer(model=model, args=tiny.args(tmp_path, max_steps=3), train_dataset=tiny.Blobs(),
                                sam_config=SAMConfig(rho=0.5), compute_loss_func=loss_fn)
    tr.train()
    ref = reference_run(init, tiny.windows(tiny.Blobs(), 4, 1, 3), "sgd", 0.1, 0.5,
                        loss_fn=lambda m, mb, w: loss_fn(m(x=mb["x"]), mb["labels"]))
    assert max_deviation(model, ref) <= 1e-6
