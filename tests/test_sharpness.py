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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
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
