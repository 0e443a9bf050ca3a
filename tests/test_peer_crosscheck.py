"""hf_sam's variants beside pytorch_optimizer's (4.x) on a tiny problem: a small MLP, fixed batches, SGD base,
weights compared after a few steps.

Where the two define a method alike the weights agree to 1e-6 (FriendlySAM / fsam, GSAM with a constant rho,
WSAM in its coupled form; LookSAM on a one-tensor model). Where the definitions differ, the test computes
what pytorch_optimizer computes from its definition by hand (a few lines of torch), checks that its optimizer
matches that, and checks that hf_sam's variant, which follows the paper (tests/test_new_variants.py,
tests/test_variants.py), is measurably different. docs/variants.md lists each difference.
"""

import copy

import pytest
import torch
from torch import nn

import tiny
from hf_sam import SAM, SAMConfig
from test_new_variants import centered, deviation

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

po = pytest.importorskip("pytorch_optimizer")

STEPS, BS, LR, MOM = 4, 4, 0.1, 0.9
TOL = 1e-6


def model0(one_tensor=False):
    torch.manual_seed(0)
    if one_tensor:
        return OneTensor()
    return tiny.MLP(d_hidden=8)


class OneTensor(nn.Module):
    """A single weight tensor (logits = x W^T): global and per-tensor norms coincide."""

    def __init__(self):
        super().__init__()
        self.w = nn.Linear(6, 3, bias=False)

    def forward(self, x, labels):
        logits = self.w(x)
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


def batches():
    return [w[0] for w in tiny.windows(tiny.Blobs(n=64), BS, 1, STEPS)]


def loss_closure(model, mb, zero):
    def closure():
        zero()
        loss = model(**mb)["loss"]
        loss.backward()
        return loss
    return closure


def run_hf(start, variant, momentum=MOM, **settings):
    model = copy.deepcopy(start)
    opt = SAM(model.named_parameters(), torch.optim.SGD, SAMConfig(variant=variant, **settings), model=model,
              max_steps=STEPS, lr=LR, momentum=momentum)
    for mb in batches():
        opt.zero_grad()
        opt.step(loss_closure(model, mb, lambda: None))
    return model


def run_po(start, make, style="presample"):
    """pytorch_optimizer's closure protocol: gradients at w first, then step(closure)."""
    model = copy.deepcopy(start)
    opt = make(model)
    for mb in batches():
        closure = loss_closure(model, mb, opt.zero_grad)
        if style == "presample":
            closure()
        opt.step(closure)
    return model


def agree(label, a, b, start):
    dev = deviation(a, b)
    print(f"{label}: max |w_hf - w_po| = {dev:.2e}")
    assert deviation(a, start) > 1e-3, f"{label}: did not train"
    assert dev <= TOL, f"{label}: {dev:.3e}"


def differ(label, hf, peer, hand, start):
    print(f"{label}: max |w_po - w_po_by_hand| = {deviation(peer, hand):.2e}, "
          f"max |w_hf - w_po| = {deviation(hf, peer):.2e}")
    assert deviation(peer, start) > 1e-3
    assert deviation(peer, hand) <= TOL, f"{label}: pytorch_optimizer does not compute what we read in its code"
    assert deviation(hf, peer) > 1e-4, f"{label}: expected the definitions to differ measurably"


# ---- the same definition --------------------------------------------------------------------------
def test_friendly_sam_equals_fsam():
    start = model0()
    hf = run_hf(start, "fsam", rho=0.3, fsam_sigma=1.0, fsam_lambda=0.6)
    peer = run_po(start, lambda m: po.FriendlySAM(m.parameters(), torch.optim.SGD, rho=0.3, sigma=1.0, lmbda=0.6,
                                                  lr=LR, momentum=MOM, foreach=False))
    agree("FriendlySAM / fsam", hf, peer, start)


class ConstantRho:
    def __init__(self, rho):
        self.rho = rho

    def step(self):
        return self.rho


def test_gsam_equals_gsam_constant_rho():
    start = model0()
    hf = run_hf(start, "gsam", rho=0.3, gsam_alpha=0.4)

    def make(m):
        return po.GSAM(m.parameters(), torch.optim.SGD(m.parameters(), lr=LR, momentum=MOM), m, ConstantRho(0.3),
                       alpha=0.4, foreach=False)

    model = copy.deepcopy(start)
    opt = make(model)
    for mb in batches():
        def closure(mb=mb):
            opt.base_optimizer.zero_grad()
            with torch.enable_grad():                            # GSAM.step runs under no_grad
                out = model(**mb)
                out["loss"].backward()
            return out, out["loss"].detach()
        opt.step(closure)
    agree("GSAM / gsam (constant rho)", hf, model, start)


@pytest.mark.parametrize("momentum,decouple", [(MOM, False), (0.0, True), (0.0, False)])
def test_wsam_coupled_equals_wsam(momentum, decouple):
    """pytorch_optimizer's decouple=False is the coupled form hf_sam implements; its decoupled default equals it
    for SGD without momentum."""
    start = model0()
    hf = run_hf(start, "wsam", momentum=momentum, rho=0.3, wsam_gamma=0.8)
    peer = run_po(start, lambda m: po.WSAM(m, m.parameters(), torch.optim.SGD, rho=0.3, gamma=0.8, decouple=decouple,
                                           lr=LR, momentum=momentum), style="closure_only")
    agree(f"WSAM / wsam (momentum {momentum}, decouple={decouple})", hf, peer, start)


def test_wsam_decoupled_with_momentum_differs():
    start = model0()
    hf = run_hf(start, "wsam", rho=0.3, wsam_gamma=0.8)
    peer = run_po(start, lambda m: po.WSAM(m, m.parameters(), torch.optim.SGD, rho=0.3, gamma=0.8, decouple=True,
                                           lr=LR, momentum=MOM), style="closure_only")
    hand = wsam_decoupled_by_hand(start, rho=0.3, gamma=0.8)
    differ("WSAM decoupled + momentum", hf, peer, hand, start)


def grads(model, mb):
    model.zero_grad()
    model(**mb)["loss"].backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def grads_at(model, mb, e):
    """Gradients at w + e (e aligned with model.parameters()); the weights are put back by subtraction."""
    params = list(model.parameters())
    with torch.no_grad():
        for p, x in zip(params, e):
            p.add_(x)
    out = grads(model, mb)
    with torch.no_grad():
        for p, x in zip(params, e):
            p.sub_(x)
    return out


def gnorm(gs):
    return torch.sqrt(sum((g ** 2).sum() for g in gs))


def wsam_decoupled_by_hand(start, rho, gamma):
    """SGD(momentum) steps with g; then w -= lr * a * (g~ - g)."""
    model = copy.deepcopy(start)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR, momentum=MOM)
    a = gamma / (1 - gamma)
    for mb in batches():
        g = grads(model, mb)
        gt = grads_at(model, mb, [rho * x / (gnorm(g) + 1e-12) for x in g])
        for p, x in zip(params, g):
            p.grad = x.clone()
        opt.step()
        with torch.no_grad():
            for p, x, y in zip(params, gt, g):
                p.add_(x - y, alpha=-LR * a)
    return model


# ---- LookSAM: per-tensor (pytorch_optimizer) vs global (hf_sam) ------------------------------------------
def test_looksam_agrees_on_one_tensor():
    start = model0(one_tensor=True)
    hf = run_hf(start, "looksam", rho=0.3, looksam_k=2, looksam_alpha=0.5)
    peer = run_po(start, lambda m: po.LookSAM(m.parameters(), torch.optim.SGD, rho=0.3, k=2, alpha=0.5, lr=LR,
                                              momentum=MOM, foreach=False))
    agree("LookSAM / looksam (one tensor)", hf, peer, start)


def looksam_per_tensor_by_hand(start, rho, k, alpha):
    model = copy.deepcopy(start)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR, momentum=MOM)
    gv = None
    for t, mb in enumerate(batches()):
        g = grads(model, mb)
        if t % k == 0:
            gs = grads_at(model, mb, [rho * x / (gnorm(g) + 1e-12) for x in g])
            u = [x / x.norm() for x in g]                          # per tensor
            gv = [y - y.norm() * (ui * y / y.norm()).sum() * ui for y, ui in zip(gs, u)]
            d = gs
        else:
            d = [x + alpha * x.norm() / (v.norm() + 1e-8) * v for x, v in zip(g, gv)]
        for p, x in zip(params, d):
            p.grad = x
        opt.step()
    return model


def test_looksam_per_tensor_differs():
    start = model0()
    hf = run_hf(start, "looksam", rho=0.3, looksam_k=2, looksam_alpha=0.5)
    peer = run_po(start, lambda m: po.LookSAM(m.parameters(), torch.optim.SGD, rho=0.3, k=2, alpha=0.5, lr=LR,
                                              momentum=MOM, foreach=False))
    differ("LookSAM per-tensor", hf, peer, looksam_per_tensor_by_hand(start, 0.3, 2, 0.5), start)


# ---- gradient centralization: the norm before (pytorch_optimizer) or after (hf_sam, the paper) ----------------
def sam_gc_by_hand(start, rho):
    """e = rho * GC(g) / ||g||: the norm of the raw gradient."""
    model = copy.deepcopy(start)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR, momentum=MOM)
    for mb in batches():
        g = grads(model, mb)
        d = grads_at(model, mb, [rho * centered(x) / (gnorm(g) + 1e-12) for x in g])
        for p, x in zip(params, d):
            p.grad = x
        opt.step()
    return model


def test_sam_use_gc_differs_from_gcsam():
    start = model0()
    hf = run_hf(start, "gcsam", rho=0.5)
    peer = run_po(start, lambda m: po.SAM(m.parameters(), torch.optim.SGD, rho=0.5, use_gc=True, lr=LR, momentum=MOM,
                                          foreach=False))
    differ("SAM(use_gc=True) / gcsam", hf, peer, sam_gc_by_hand(start, 0.5), start)


# ---- bSAM ----------------------------------------------------------------------------------------------------
def bsam_po_by_hand(start, *, n, lr, rho, wd, damping, betas=(0.9, 0.999)):
    """What pytorch_optimizer 4.1's BSAM computes (its step: noise, closure, ascent, closure, update)."""
    model = copy.deepcopy(start)
    params = list(model.parameters())
    s = [torch.ones_like(p) for p in params]
    m = [torch.zeros_like(p) for p in params]
    b1, b2 = betas
    for mb in batches():
        with torch.no_grad():
            for p, si in zip(params, s):
                p.add_(torch.normal(0.0, 1 / (n * si)))          # std 1 / (N s)
        g = grads(model, mb)                                     # at w + xi
        with torch.no_grad():
            for p, x, si in zip(params, g, s):
                p.add_(rho * x / si)                             # from w + xi, never put back
        g2 = grads(model, mb)                                    # at w + xi + e
        with torch.no_grad():
            for i, p in enumerate(params):
                m[i] = b1 * m[i] + (1 - b1) * g2[i] * wd         # the gradient times weight_decay
                s[i] = b2 * s[i] + (1 - b2) * (s[i].sqrt() * g2[i].abs() + wd + damping) ** 2
                p.sub_(lr * m[i] / s[i])                         # the new s
    return model


def test_bsam_differs():
    start = model0()
    n, rho, lr, wd, damping = 64, 0.05, 0.2, 1e-2, 0.1
    hf = run_hf(start, "bsam", momentum=0.0, rho=rho, bsam_num_data=n, bsam_prior_precision=wd * n,
                bsam_damping=damping)
    torch.manual_seed(1)
    peer = run_po(start, lambda m: po.BSAM(m.parameters(), num_data=n, lr=lr, weight_decay=wd, rho=rho,
                                           damping=damping, foreach=False))
    torch.manual_seed(1)
    hand = bsam_po_by_hand(start, n=n, lr=lr, rho=rho, wd=wd, damping=damping)
    differ("BSAM / bsam", hf, peer, hand, start)
