"""hf_sam.sharpness against independent references: the exact Hessian of a tiny MLP
(torch.autograd.functional.hessian), hand-written m-sharpness loops, and a 2-process DDP run."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call
from transformers import Trainer, TrainerCallback, TrainingArguments

import tiny  # noqa: E402

from hf_sam import SAMTrainer  # noqa: E402
from hf_sam.sharpness import (  # noqa: E402
    SharpnessCallback,
    hessian_eigenvalues,
    hessian_eigenvalues_by_group,
    hessian_trace,
    m_sharpness,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return tiny.MLP(d_in=3, d_hidden=4, n_classes=3, **kw)


def make_batches(n_batches=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(size, 3, generator=g), "labels": torch.randint(0, 3, (size,), generator=g)}
            for _ in range(n_batches)]


def exact_hessian(model, batches, names=None):
    """The Hessian of the mean batch loss over the flat vector of the named parameters, in float64."""
    model = model.double()
    named = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    shapes = [p.shape for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss(vec):
        tensors, i = {}, 0
        for (n, _), s in zip(named, shapes):
            tensors[n] = vec[i:i + s.numel()].view(s)
            i += s.numel()
        losses = [functional_call(model, tensors, kwargs={"x": b["x"].double(), "labels": b["labels"]})["loss"]
                  for b in batches]
        return torch.stack(losses).mean()

    H = torch.autograd.functional.hessian(loss, flat)
    model.float()
    return H


def top_by_magnitude(H, k):
    ev = torch.linalg.eigvalsh(H)
    return ev[torch.argsort(ev.abs(), descending=True)[:k]].tolist()


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_weights(model, before):
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("method,iters", [("power", 3000), ("lanczos", 100)])
def test_eigenvalues_match_the_exact_hessian(method, iters):
    model, batches = make_model(seed=2), make_batches()  # a spectrum with a negative eigenvalue in its top 3
    H = exact_hessian(model, batches)
    expected = top_by_magnitude(H, 3)
    before = state(model)
    got = hessian_eigenvalues(model, batches, k=3, iters=iters, tol=1e-5, method=method)
    assert_same_weights(model, before)
    scale = abs(expected[0])
    for g, e in zip(got, expected):
        assert abs(g - e) <= 1e-3 * scale, (got, expected)
    # the algebraically largest differ: the third largest magnitude is a negative curvature
    largest = torch.linalg.eigvalsh(H).flip(0)[:3].tolist()
    assert expected[2] < 0 and abs(largest[2] - expected[2]) > 0.5
    got = hessian_eigenvalues(model, batches, k=3, iters=iters, tol=1e-5, method=method, which="largest")
    for g, e in zip(got, largest):
        assert abs(g - e) <= 1e-3 * scale, (got, largest)


def test_eigenvalues_of_a_parameter_subset_and_per_module_blocks():
    model, batches = make_model(), make_batches()
    names = ["head.weight", "head.bias"]
    block = exact_hessian(model, batches, names=names)
    got = hessian_eigenvalues(model, batches, k=2, params=names, iters=60, method="lanczos", tol=1e-8)
    for g, e in zip(got, top_by_magnitude(block, 2)):
        assert abs(g - e) <= 1e-3 * abs(top_by_magnitude(block, 1)[0])
    by_group = hessian_eigenvalues_by_group(model, batches, iters=200, tol=1e-8, method="lanczos")
    assert set(by_group) == {"fc1", "head"}
    fc1 = top_by_magnitude(exact_hessian(model, batches, names=["fc1.weight", "fc1.bias"]), 1)[0]
    assert by_group["fc1"] == pytest.approx(fc1, rel=1e-3)
    assert by_group["head"] == pytest.approx(top_by_magnitude(block, 1)[0], rel=1e-3)


@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_trace_within_four_standard_errors(method):
    model, batches = make_model(), make_batches()
    exact = torch.trace(exact_hessian(model, batches)).item()
    before = state(model)
    trace, stderr = hessian_trace(model, batches, samples=60, seed=3, method=method, return_stderr=True)
    assert_same_weights(model, before)
    assert stderr > 0
    assert abs(trace - exact) <= 4 * stderr, (trace, exact, stderr)
    assert hessian_trace(model, batches, samples=60, seed=3, method=method) == trace  # deterministic given seed


def hand_m_sharpness(model, batches, rho, m, adaptive=False, eta=0.01):
    """Foret et al.'s m-sharpness, written out: per chunk of m samples, e from its own gradient."""
    model.eval()
    named = dict(model.named_parameters())
    increases = []
    for batch in batches:
        for i in range(0, len(batch["labels"]), m):
            chunk = {k: v[i:i + m] for k, v in batch.items()}
            loss = model(**chunk)["loss"]
            grads = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
            T = {n: (p.detach().abs() + eta if adaptive and n.endswith("weight") else torch.ones_like(p))
                 for n, p in named.items()}
            norm = math.sqrt(sum(((T[n] * g) ** 2).sum().item() for n, g in grads.items()))
            moved = {n: p.detach() + rho * T[n] ** 2 * grads[n] / (norm + 1e-12) for n, p in named.items()}
            with torch.no_grad():
                increases.append(functional_call(model, moved, kwargs=chunk)["loss"].item() - loss.item())
    return sum(increases) / len(increases)


@pytest.mark.parametrize("adaptive,rho", [(False, 0.05), (True, 0.5)])
def test_m_sharpness_matches_a_hand_written_loop(adaptive, rho):
    model, batches = make_model(), make_batches(size=8)
    expected = hand_m_sharpness(model, batches, rho, m=4, adaptive=adaptive)
    before = state(model)
    got = m_sharpness(model, batches, rho, m=4, adaptive=adaptive)
    assert_same_weights(model, before)
    assert abs(got - expected) <= 1e-5
    assert expected > 0
    # m=None: each batch is one chunk
    assert m_sharpness(model, batches, rho, adaptive=adaptive) == pytest.approx(
        hand_m_sharpness(model, batches, rho, m=8, adaptive=adaptive), abs=1e-5)


class Quadratic(nn.Module):
    """loss = 0.5 (w - c)^T A (w - c) with A symmetric: Hessian A, gradient A (w - c)."""

    def __init__(self, A, c, w):
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("c", c)
        self.w = nn.Parameter(w.clone())

    def forward(self, x, labels=None):
        d = self.w - self.c
        return {"loss": 0.5 * d @ self.A @ d + 0 * x.sum()}


def quadratic(seed=0, at_minimum=False, n=6):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    A = Q @ torch.diag(torch.linspace(0.2, 3.0, n)) @ Q.T
    c = torch.randn(n, generator=g)
    return Quadratic(A, c, c if at_minimum else c + torch.randn(n, generator=g)), [{"x": torch.zeros(1, 1)}]


def test_worst_case_ascent_steps_and_average_case_on_a_quadratic():
    model, batches = quadratic()
    rho = 0.5
    gnorm = torch.linalg.vector_norm(model.A @ (model.w - model.c)).item()
    one = m_sharpness(model, batches, rho, steps=1)
    many = m_sharpness(model, batches, rho, steps=10)
    # the exact maximum of g.e + e^T A e / 2 on ||e|| = rho (trust-region problem): e = (lam I - A)^-1 g with
    # lam > max eig(A) and ||e|| = rho, lam found by bisection in A's eigenbasis
    a, Q = torch.linalg.eigh(model.A.double())
    g = Q.T @ (model.A @ (model.w - model.c)).detach().double()
    lo, hi = a.max().item() + 1e-12, a.max().item() + 1e6
    for _ in range(200):
        lam = (lo + hi) / 2
        lo, hi = (lam, hi) if ((g / (lam - a)) ** 2).sum().sqrt() > rho else (lo, lam)
    e = g / (lam - a)
    best = (g @ e + 0.5 * (a * e * e).sum()).item()
    assert one < many <= best * (1 + 1e-5) and many >= best * (1 - 1e-4), (one, many, best)
    assert many <= rho * gnorm + 0.5 * rho ** 2 * 3.0 + 1e-6
    # average case at the minimum: E[L(w + rho z/||z||) - L(w)] = rho^2 tr(A) / (2 n)
    model, batches = quadratic(at_minimum=True)
    avg = m_sharpness(model, batches, rho, kind="average", steps=4000, seed=1)
    assert avg == pytest.approx(rho ** 2 * torch.trace(model.A).item() / 12, rel=0.05)
    assert m_sharpness(model, batches, rho) == pytest.approx(0.0, abs=1e-7)  # no gradient: no ascent


def test_state_of_the_caller_is_untouched():
    model, batches = make_model(batchnorm=True, dropout=0.5), make_batches()
    model.train()
    model.head.eval()  # a mixed-mode model comes back mixed
    model.fc1.bias.requires_grad_(False)
    grads = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n]
    before, bn = state(model), {k: v.clone() for k, v in model.bn.state_dict().items()}
    for train_mode in (False, True):
        hessian_eigenvalues(model, batches, iters=3, train_mode=train_mode)
        hessian_trace(model, batches, samples=3, train_mode=train_mode)
        m_sharpness(model, batches, 0.1, m=4, train_mode=train_mode, params=["fc1.weight", "fc1.bias"])
        hessian_eigenvalues_by_group(model, batches, iters=2, train_mode=train_mode)
        assert_same_weights(model, before)
        for k, v in model.bn.state_dict().items():
            assert torch.equal(v, bn[k]), k
        for n, p in model.named_parameters():
            assert p.grad is grads[n] and torch.equal(p.grad, torch.full_like(p, 7.0))
        assert model.training and model.fc1.training and not model.head.training
        assert not model.fc1.bias.requires_grad


def test_train_mode_measures_with_dropout_and_batch_statistics():
    model, batches = make_model(batchnorm=True), make_batches()
    eval_value = m_sharpness(model, batches, 0.1)
    assert m_sharpness(model, batches, 0.1, train_mode=True) != eval_value  # batch statistics, not running ones


def test_bad_input_is_named():
    model, batches = make_model(), make_batches()
    with pytest.raises(ValueError, match="no loss"):
        hessian_trace(model, [{"x": b["x"]} for b in batches], samples=2)
    with pytest.raises(ValueError, match="no parameter named 'nope'"):
        m_sharpness(model, batches, 0.1, params=["nope"])
    with pytest.raises(ValueError, match="which='smallest'"):
        hessian_eigenvalues(model, batches, which="smallest")
    with pytest.raises(ValueError, match="method='qr'"):
        hessian_eigenvalues(model, batches, method="qr")
    with pytest.raises(ValueError, match="rho=-1"):
        m_sharpness(model, batches, -1)
    with pytest.raises(ValueError, match="kind="):
        m_sharpness(model, batches, 0.1, kind="best")
    with pytest.raises(ValueError, match="empty"):
        hessian_trace(model, [], samples=2)
    with pytest.raises(ValueError, match="measures="):
        SharpnessCallback(measures=("flatness",))
    with pytest.raises(ValueError, match="every="):
        SharpnessCallback(every=0)


# -----------------------------------------------------------------------------
# DDP: two processes, each with half the batches, equal one process on the union


def test_two_process_ddp_equals_one_process_on_the_union(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           os.path.join(HERE, "sharpness_ddp_worker.py"), str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers: no orphan keeps waiting
        output, _ = proc.communicate()
    assert proc.returncode == 0, output[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    shares = [r["callback"].pop("held_out_labels") for r in (r0, r1)]
    assert r0 == r1  # every rank returns the same all-reduced value
    assert r0["weights_unchanged"]

    model, batches = make_model(), make_batches(n_batches=4)  # the union of the ranks' batches
    assert r0["m_sharpness"] == pytest.approx(m_sharpness(model, batches, 0.1, m=4), abs=1e-5)
    assert r0["m_sharpness"] == pytest.approx(hand_m_sharpness(model, batches, 0.1, m=4), abs=1e-5)
    expected = top_by_magnitude(exact_hessian(model, batches), 2)
    for g, e in zip(r0["eigenvalues"], expected):
        assert abs(g - e) <= 1e-3 * abs(expected[0])
    one = hessian_trace(model, batches, samples=20, seed=5, return_stderr=True)
    assert r0["trace"][0] == pytest.approx(one[0], rel=1e-5)  # the same Rademacher vectors on every rank
    assert r0["trace"][1] == pytest.approx(one[1], rel=1e-4)
    # max_seconds with clocks that disagree: the ranks stopped together, at the sample where the faster clock ran out
    budget = r0["budget"]
    assert budget["stopped"] == "max_seconds" and 2 <= budget["samples"] < 40
    cut = hessian_trace(model, batches, samples=budget["samples"], seed=5, return_stderr=True)
    assert budget["trace"] == pytest.approx(list(cut), rel=1e-4)

    # the callback on a stock Trainer under DDP: each rank measured 2 of the 4 eval batches
    logged = r0["callback"]["logged"]
    assert [e["step"] for e in logged] == [2]
    model = tiny.MLP(d_in=3)
    model.load_state_dict({n: torch.tensor(v) for n, v in r0["callback"]["weights"].items()})
    held_out = tiny.Blobs(n=32, d_in=3, seed=9)
    batches = [{"x": held_out.x[i:i + 8], "labels": held_out.y[i:i + 8]} for i in range(0, 32, 8)]
    assert len(shares[0]) == len(shares[1]) == 2 and shares[0] != shares[1]
    assert sorted(shares[0] + shares[1]) == sorted(b["labels"].tolist() for b in batches)
    assert logged[0]["sharpness/m_sharpness"] == pytest.approx(hand_m_sharpness(model, batches, 0.05, 8), abs=1e-5)
    lambda_max = torch.linalg.eigvalsh(exact_hessian(model, batches))[-1].item()
    assert logged[0]["sharpness/top_eigenvalue"] == pytest.approx(lambda_max, rel=1e-3)


# -----------------------------------------------------------------------------
# The callback, on a stock Trainer and on SAMTrainer


class Recorder(TrainerCallback):
    """Stands for a reporting integration: everything passed to on_log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def trainer_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4, learning_rate=0.1,
                optim="sgd", lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
                logging_steps=1, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8, seed=0,
                disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


@pytest.mark.parametrize("cls", [Trainer, SAMTrainer])
def test_callback_logs_on_every_evaluation(tmp_path, cls):
    dataset, held_out = tiny.Blobs(n=64, d_in=3), tiny.Blobs(n=16, d_in=3, seed=9)
    torch.manual_seed(0)
    plain = cls(model=tiny.MLP(d_in=3), args=trainer_args(tmp_path / "plain"), train_dataset=dataset,
                eval_dataset=held_out)
    plain.train()
    torch.manual_seed(0)
    model = tiny.MLP(d_in=3)
    recorder = Recorder()
    trainer = cls(model=model, args=trainer_args(tmp_path / "measured"), train_dataset=dataset,
                  eval_dataset=held_out, callbacks=[recorder])
    callback = SharpnessCallback.attach(trainer, max_batches=2, iters=200, tol=1e-7, samples=4, rho=0.1, m=4)
    trainer.train()
    keys = {"sharpness/top_eigenvalue", "sharpness/trace", "sharpness/m_sharpness"}
    logged = [e for e in trainer.state.log_history if keys <= set(e)]
    assert [e["step"] for e in logged] == [2, 4]
    trainer.evaluate()  # the weights of step 4 were measured already
    assert len([e for e in trainer.state.log_history if keys <= set(e)]) == 2
    assert [e for e in recorder.logs if keys <= set(e)] == [{k: e[k] for k in e if k != "step"} for e in logged]
    assert len(callback.seconds) == 2
    # measuring changes nothing about training
    for (n, p), q in zip(model.named_parameters(), plain.model.parameters()):
        assert torch.equal(p, q), n
    # the last values are the final model's, on the trainer's first two eval batches
    batches = [{"x": held_out.x[i:i + 8], "labels": held_out.y[i:i + 8]} for i in (0, 8)]
    H = exact_hessian(model, batches)
    assert logged[-1]["sharpness/top_eigenvalue"] == pytest.approx(top_by_magnitude(H, 1)[0], rel=1e-3)
    assert logged[-1]["sharpness/m_sharpness"] == pytest.approx(hand_m_sharpness(model, batches, 0.1, 4), abs=1e-5)


def test_callback_every_n_steps_on_its_own_dataset(tmp_path):
    dataset, held_out = tiny.Blobs(n=64, d_in=3), tiny.Blobs(n=24, d_in=3, seed=9)
    trainer = SAMTrainer(model=tiny.MLP(d_in=3), args=trainer_args(tmp_path, eval_strategy="no"),
                         train_dataset=dataset)
    SharpnessCallback.attach(trainer, eval_dataset=held_out, batch_size=8, max_batches=None, every=3,
                             measures=["m_sharpness"])
    trainer.train()
    logged = [e for e in trainer.state.log_history if "sharpness/m_sharpness" in e]
    assert [e["step"] for e in logged] == [3] and "sharpness/trace" not in logged[0]
    # without a trainer: log_history only, with a warning
    batches = [{"x": held_out.x[:8], "labels": held_out.y[:8]}]
    trainer = Trainer(model=tiny.MLP(d_in=3), args=trainer_args(tmp_path / "b", eval_strategy="no"),
                      train_dataset=dataset,
                      callbacks=[SharpnessCallback(batches, every=2, measures="trace", samples=2)])
    with pytest.warns(UserWarning, match="attach"):
        trainer.train()
    assert [e["step"] for e in trainer.state.log_history if "sharpness/trace" in e] == [2, 4]


# -----------------------------------------------------------------------------
# The callback changes nothing about training: random streams, logs


def training_entries(trainer):
    """The Trainer's own log entries (everything but the callback's)."""
    return [e for e in trainer.state.log_history if not any(k.startswith("sharpness/") for k in e)]


def dropout_bn_run(tmp_path, cls, every, callback, ga=2):
    """A dropout + BatchNorm MLP over two epochs (the second epoch's shuffle draws from the global RNG)."""
    torch.manual_seed(0)
    model = tiny.MLP(d_in=3, dropout=0.3, batchnorm=True)
    args = trainer_args(tmp_path, max_steps=6, eval_steps=3, gradient_accumulation_steps=ga,
                        per_device_train_batch_size=4)
    trainer = cls(model=model, args=args, train_dataset=tiny.Blobs(n=40, d_in=3),
                  eval_dataset=tiny.Blobs(n=16, d_in=3, seed=9))
    if callback:
        SharpnessCallback.attach(trainer, every=every, max_batches=2, iters=5, samples=2, rho=0.1, m=4)
    trainer.train()
    return model, trainer


@pytest.mark.parametrize("cls,every", [(Trainer, "eval"), (Trainer, 2), (SAMTrainer, "eval"), (SAMTrainer, 2)])
def test_callback_leaves_training_bit_identical_with_dropout_and_batchnorm(tmp_path, cls, every):
    plain, plain_trainer = dropout_bn_run(tmp_path / "plain", cls, every, callback=False)
    measured, trainer = dropout_bn_run(tmp_path / "measured", cls, every, callback=True)
    logged = [e["step"] for e in trainer.state.log_history if "sharpness/trace" in e]
    assert logged == ([3, 6] if every == "eval" else [2, 4, 6])
    for (n, p), q in zip(measured.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), n
    for a, b in zip(measured.buffers(), plain.buffers()):  # BatchNorm running statistics
        assert torch.equal(a, b)
    # the Trainer's own entries (training loss at every step, evaluations, the summary) are all there, equal
    ours, theirs = training_entries(trainer), training_entries(plain_trainer)
    assert [e["step"] for e in ours if "loss" in e] == [1, 2, 3, 4, 5, 6]
    strip = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
             "eval_samples_per_second", "eval_steps_per_second")
    assert [{k: v for k, v in e.items() if k not in strip} for e in ours] == \
        [{k: v for k, v in e.items() if k not in strip} for e in theirs]


def test_callback_leaves_a_lora_run_with_dropout_bit_identical(tmp_path):
    peft = pytest.importorskip("peft")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (40, 16), generator=g)
    train = [{"input_ids": x, "labels": x} for x in ids[:32]]
    valid = [{"input_ids": x, "labels": x} for x in ids[32:]]

    def run(out, callback):
        model = peft.get_peft_model(tiny.gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.2))
        args = trainer_args(out, max_steps=3, eval_steps=3, learning_rate=0.05, gradient_accumulation_steps=2,
                            per_device_train_batch_size=4)
        trainer = SAMTrainer(model=model, args=args, train_dataset=train, eval_dataset=valid)
        if callback:
            SharpnessCallback.attach(trainer, every=1, max_batches=1, iters=3, samples=2)
        trainer.train()
        return model, trainer

    plain, plain_trainer = run(tmp_path / "plain", False)
    measured, trainer = run(tmp_path / "measured", True)
    assert [e["step"] for e in trainer.state.log_history if "sharpness/m_sharpness" in e] == [1, 2, 3]
    for (n, p), q in zip(measured.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), n
    assert [e["loss"] for e in training_entries(trainer) if "loss" in e] == \
        [e["loss"] for e in training_entries(plain_trainer) if "loss" in e]


def test_preserved_rng_puts_back_every_stream():
    import random

    import numpy as np

    from hf_sam.sharpness import preserved_rng

    loader = torch.utils.data.DataLoader(list(range(10)), shuffle=True, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    expected = (torch.rand(3), random.random(), np.random.rand(), list(loader))
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    loader.generator.manual_seed(3)
    with preserved_rng(loader):
        torch.rand(5), random.random(), np.random.rand(2), list(loader)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2] and [t.tolist() for t in loader] == [t.tolist() for t in expected[3]]


def test_every_eval_without_evaluation_is_refused_before_training(tmp_path):
    model = tiny.MLP(d_in=3)
    before = state(model)
    trainer = Trainer(model=model, args=trainer_args(tmp_path, eval_strategy="no"),
                      train_dataset=tiny.Blobs(n=64, d_in=3), eval_dataset=tiny.Blobs(n=16, d_in=3, seed=9))
    SharpnessCallback.attach(trainer)
    with pytest.raises(ValueError, match=r"every='eval'.*eval_strategy='no'.*every=N"):
        trainer.train()
    assert_same_weights(model, before)
    assert trainer.state.global_step == 0


def test_held_out_set_is_cut_to_max_samples(tmp_path):
    held_out = tiny.Blobs(n=100, d_in=3, seed=9)
    callback = SharpnessCallback(eval_dataset=held_out, batch_size=48)  # defaults: 4 batches, 64 examples
    batches = callback.held_out_batches()
    assert [len(b["labels"]) for b in batches] == [48, 16]
    assert torch.equal(torch.cat([b["x"] for b in batches]), held_out.x[:64])
    assert [len(b["labels"]) for b in SharpnessCallback(eval_dataset=held_out, batch_size=48, max_samples=None)
            .held_out_batches()] == [48, 48, 4]
    given = make_batches(n_batches=12, size=8)  # batches given explicitly are used as given
    assert SharpnessCallback(given).held_out_batches() == given
    for bad in (dict(max_samples=0), dict(max_batches=1.5), dict(max_seconds=0), dict(max_seconds=-1),
                dict(progress="yes")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SharpnessCallback(**bad)


# -----------------------------------------------------------------------------
# Cost: the estimate, max_seconds, the progress bar


class Clocked(nn.Module):
    """tiny.MLP whose every forward advances a fake clock by one second."""

    def __init__(self, clock):
        super().__init__()
        self.inner, self.clock = make_model(), clock

    def forward(self, **batch):
        self.clock[0] += 1.0
        return self.inner(**batch)


@pytest.fixture
def fake_clock(monkeypatch):
    from hf_sam import sharpness

    clock = [0.0]
    monkeypatch.setattr(sharpness, "_clock", lambda: clock[0])
    return clock


def test_max_seconds_stops_early_and_reports_what_was_done(fake_clock, caplog):
    model, batches = Clocked(fake_clock), make_batches(n_batches=2)  # a product: 2 forwards = 2 s
    H = exact_hessian(model.inner, batches)
    # Lanczos: products at t = 2, 4, 6; the 4th would end at 8 > 7.5: stopped after 3, the Ritz value of 3 steps
    with caplog.at_level("INFO", logger="hf_sam.sharpness"):
        values, info = hessian_eigenvalues(model, batches, iters=20, tol=1e-9, which="largest", max_seconds=7.5,
                                           return_info=True)
    assert info["stopped"] == "max_seconds" and info["products"] == 3 and info["passes"] == 3 * 3 * 2
    assert values == hessian_eigenvalues(model, batches, iters=3, tol=1e-9, which="largest")
    assert values[0] <= torch.linalg.eigvalsh(H)[-1].item() + 1e-4  # a Ritz value: below lambda_max
    assert 0 < info["residual"] < 1
    text = caplog.text
    assert "at most 20 products of 6 passes each (120 passes" in text  # before the first product
    assert "the first product took 2 s; at most 20 products: about 40 s" in text  # after it
    assert "stopped by max_seconds=7.5 after 3 of 20 products" in text and "relative residual" in text
    # converged within the budget: no cut
    _, info = hessian_eigenvalues(model, batches, iters=50, tol=1e-3, return_info=True)
    assert info["stopped"] == "converged"
    # power iteration: the budget ends the first eigenvector's iterations; the second still gets its product
    values, info = hessian_eigenvalues(model, batches, k=2, iters=100, tol=1e-12, method="power", max_seconds=9,
                                       return_info=True)
    assert len(values) == 2 and info["stopped"] == "max_seconds" and info["products"] == 4 + 1
    # per-module blocks: 3 s for the first group (1 product), the 4 s left for the second (2 products)
    by_group, infos = hessian_eigenvalues_by_group(model, batches, iters=30, tol=1e-12, max_seconds=6,
                                                   return_info=True)
    assert set(by_group) == set(infos) == {"inner.fc1", "inner.head"}
    assert [infos[g]["products"] for g in ("inner.fc1", "inner.head")] == [1, 2]

    # Hutchinson: 5 samples fit in 10.5 s; the mean and standard error of those 5 z^T H z, with the exact Hessian
    trace, stderr, info = hessian_trace(model, batches, samples=100, seed=4, max_seconds=10.5, return_stderr=True,
                                        return_info=True)
    g = torch.Generator().manual_seed(4)
    quad = []
    for _ in range(5):
        z = torch.cat([(torch.randint(0, 2, p.shape, generator=g).float() * 2 - 1).reshape(-1)
                       for p in model.inner.parameters()]).double()
        quad.append((z @ H @ z).item())
    quad = torch.tensor(quad)
    assert info["stopped"] == "max_seconds" and info["samples"] == 5
    assert trace == pytest.approx(quad.mean().item(), rel=1e-4)
    assert stderr == pytest.approx((quad.std() / math.sqrt(5)).item(), rel=1e-3) and info["stderr"] == stderr
    with pytest.raises(ValueError, match="max_seconds=0"):
        hessian_trace(model, batches, max_seconds=0)

    # m-sharpness: a chunk costs 2 forwards; 3 of the 4 chunks fit in 7 s
    value, info = m_sharpness(model, batches, 0.1, m=4, max_seconds=7, return_info=True)
    chunks = [{"x": b["x"][i:i + 4], "labels": b["labels"][i:i + 4]} for b in batches for i in (0, 4)]
    assert info["stopped"] == "max_seconds" and info["chunks"] == 3 and info["passes"] == 9
    assert value == pytest.approx(hand_m_sharpness(model.inner, chunks[:3], 0.1, m=4), abs=1e-5)


def test_long_measurements_warn_and_show_a_bar(fake_clock, caplog, capsys):
    model, batches = Clocked(fake_clock), make_batches(n_batches=20)  # a product: 20 s, LONG_SECONDS is 30
    with caplog.at_level("INFO", logger="hf_sam.sharpness"):
        hessian_trace(model, batches, samples=2)  # 40 s projected: a warning
        hessian_trace(make_model(), batches, samples=2)  # the real clock: quick, at INFO
    levels = [r.levelname for r in caplog.records if "the first product took" in r.getMessage()]
    assert levels == ["WARNING", "INFO"]
    capsys.readouterr()
    hessian_trace(model, batches, samples=3, progress=True)
    assert "3/3" in capsys.readouterr().err
    hessian_trace(model, batches, samples=3, progress=False)
    assert capsys.readouterr().err == ""


def test_callback_shares_max_seconds_over_the_measures(tmp_path, fake_clock):
    model = Clocked(fake_clock)
    callback = SharpnessCallback(make_batches(n_batches=2), max_seconds=12, iters=50, tol=1e-12, samples=50)
    values = callback.measure(model)
    assert set(values) == {"sharpness/top_eigenvalue", "sharpness/trace", "sharpness/m_sharpness"}
    report = callback.reports[-1]
    # 4 s each: 2 products, then 2 products (2 samples, the minimum), then 2 of the 2 chunks (1 forward + 1 backward)
    assert report["top_eigenvalue"]["products"] == 2 and report["top_eigenvalue"]["stopped"] == "max_seconds"
    assert report["trace"]["samples"] == 2
    assert report["m_sharpness"]["chunks"] == 2 and report["m_sharpness"]["stopped"] == "chunks"
    assert callback.seconds == [pytest.approx(2 * 2 + 2 * 2 + 2 * 2)]
