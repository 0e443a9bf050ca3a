"""The engine's cheap paths keep its invariants.

The ascent and the non-finite guard have two branches: on a CPU the step reads its scalars (norm,
finiteness) on the host, which syncs nothing, and keeps the scale and the metrics as Python numbers;
on an accelerator they stay device tensors. Both are run here on the CPU (the device branch by
forcing `_host_read_is_free` off) against a plain-torch SAM written from the paper's equations, with
the guard's two cases. And: a one-pass variant takes no RNG snapshot, a two-pass one does, and a
variant that declares one pass but runs two is refused rather than replaying nothing.
"""

import dataclasses
import math

import pytest
import torch

import hf_sam.step as step
import tiny
from hf_sam import SAM, SAMConfig, ops

RHO, LR, STEPS = 0.1, 0.1, 3


def batches():
    data = tiny.Blobs(n=4 * STEPS)
    return [{"x": data.x[4 * i:4 * i + 4], "labels": data.y[4 * i:4 * i + 4]} for i in range(STEPS)]


def engine_run(monkeypatch, branch, variant="sam", poison=None, **cfg):
    """STEPS steps of hf_sam.SAM around plain SGD; `poison`: the closure call whose loss is made NaN."""
    if branch == "device":
        monkeypatch.setattr(step, "_host_read_is_free", lambda t: False)
    torch.manual_seed(0)
    model = tiny.MLP()
    opt = SAM(model.named_parameters(), torch.optim.SGD, config=SAMConfig(variant=variant, rho=RHO, **cfg), lr=LR, model=model,
              **({"momentum": 0.9} if variant == "msam" else {}))
    calls = [0]
    for b in batches():
        def closure(b=b):
            calls[0] += 1
            loss = model(**b)["loss"]
            if calls[0] == poison:
                loss = loss * float("nan")
            loss.backward()
            return loss

        opt.step(closure)
        opt.zero_grad()
    return model, opt.metrics()


def reference_run(poison=None):
    """SAM (Foret et al.): e = rho g / ||g||; w <- w - lr grad L(w + e); with the guard's two rules."""
    torch.manual_seed(0)
    model = tiny.MLP()
    params = list(model.parameters())
    calls, skipped = [0], 0

    def grad():
        calls[0] += 1
        loss = model(**b)["loss"]
        if calls[0] == poison:
            loss = loss * float("nan")
        return loss, torch.autograd.grad(loss, params)

    for b in batches():
        _, g = grad()
        norm = torch.sqrt(sum((x.float() ** 2).sum() for x in g))
        finite = bool(torch.isfinite(norm))
        e = [RHO * x / (norm + 1e-12) if finite else torch.zeros_like(x) for x in g]
        skipped += not finite
        with torch.no_grad():
            for p, x in zip(params, e):
                p.add_(x)
        loss, d = grad()
        with torch.no_grad():
            for p, x in zip(params, e):
                p.sub_(x)
            if finite and not (math.isfinite(loss.item()) and all(bool(torch.isfinite(x).all()) for x in d)):
                d, skipped = [torch.zeros_like(x) for x in d], skipped + 1  # perturbed pass dropped
            for p, x in zip(params, d):
                p.sub_(LR * x)
    return model, skipped


@pytest.mark.parametrize("branch", ["host", "device"])
@pytest.mark.parametrize("poison", [None, 1, 2], ids=["finite", "nan-ascent", "nan-perturbed"])
def test_both_branches_match_the_sam_reference_and_the_guard(monkeypatch, branch, poison):
    model, metrics = engine_run(monkeypatch, branch, poison=poison)
    ref, skipped = reference_run(poison)
    for p, r in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, r, rtol=1e-5, atol=1e-6), (branch, poison)
    assert metrics["sam/skipped"] == skipped
    assert metrics["sam/perturbation_norm"] == pytest.approx(RHO * (STEPS - (poison == 1)) / STEPS, rel=1e-5)


@pytest.mark.parametrize("variant", ["sam", "msam"])
def test_host_and_device_branches_agree_with_rho_scaling(monkeypatch, variant):
    """The s and q factors (muP^2 rho scaling) go through the one-read norms in both branches alike."""
    cfg = dict(rho_scaling="mupp", mupp_base_width=4, mupp_width=12, mupp_roles={r"^fc1\.": "input", r"^head\.": "output"})
    host_model, host_metrics = engine_run(monkeypatch, "host", variant, **cfg)
    dev_model, dev_metrics = engine_run(monkeypatch, "device", variant, **cfg)
    for p, r in zip(host_model.parameters(), dev_model.parameters()):
        assert torch.allclose(p, r, rtol=1e-6, atol=1e-7)
    for k, v in host_metrics.items():
        assert dev_metrics[k] == pytest.approx(v, rel=1e-5), k
    assert host_metrics["sam/perturbation_norm"] > 0  # |scale| ||s g||: a norm, also for msam's negative rho


def test_rng_snapshot_only_where_a_pass_replays_it(monkeypatch):
    taken = []
    real = ops.rng_state
    monkeypatch.setattr(ops, "rng_state", lambda: taken.append(1) or real())
    engine_run(monkeypatch, "host", "msam")
    assert not taken  # one pass: nothing to replay
    engine_run(monkeypatch, "host", "sam")
    assert len(taken) == STEPS
    taken.clear()  # looksam k=2: refreshes (two passes) on steps 0 and 2, one pass on step 1
    engine_run(monkeypatch, "host", "looksam", looksam_k=2)
    assert len(taken) == 2


def test_looksam_without_the_snapshot_keeps_its_numbers(monkeypatch):
    """Skipping the RNG snapshot between refreshes changes no number: on a dropout model (same_dropout on),
    the same looksam run with the snapshot forced on every step (one_pass_now removed) gives the same
    weights bit for bit, and the refresh steps still replay the clean pass's dropout mask."""
    def run(lean):
        torch.manual_seed(0)
        model = tiny.MLP(dropout=0.5)
        opt = SAM(model.named_parameters(), torch.optim.SGD, config=SAMConfig(variant="looksam", rho=RHO, looksam_k=2),
                  lr=LR, model=model)
        if not lean:
            monkeypatch.setattr(opt, "variant", dataclasses.replace(opt.variant, one_pass_now=None))
        tiny.closure_steps(opt, model, [[b] for b in batches() * 2])
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(True), run(False)))


def test_a_variant_that_declares_one_pass_and_runs_two_is_refused(monkeypatch):
    torch.manual_seed(0)
    model = tiny.MLP()
    opt = SAM(model.named_parameters(), torch.optim.SGD, config=SAMConfig(rho=RHO), lr=LR)
    monkeypatch.setattr(opt, "variant", dataclasses.replace(opt.variant, passes=1))  # sam's two passes, claiming one
    b = batches()[0]
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        loss = model(**b)["loss"]
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="passes=1"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # weights back at w
