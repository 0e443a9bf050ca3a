"""LookSAM's two reuse rules against a plain-torch LookSAM written from the equations.

Refresh steps (t % k == 0), per micro-batch: g_s = grad L(w + rho g / ||g||), descend with g_s and
store g_v = g_s - (g . g_s) / ||g||^2 g. Between refreshes, one pass:
- the paper's rule (looksam_alpha a number): g + alpha ||g|| / ||g_v|| g_v;
- the default (looksam_alpha None): g + ||g|| / ||g_refresh|| g_v, ||g_refresh|| the refresh's
  clean-gradient norm (with accumulation: g_v and ||g_refresh|| summed over its micro-batches).
The reference keeps the parameters as one flat vector, replays the in-order trainer's micro-batches
(mean-loss units, weight 1 / GA) and steps torch's own optimizer; weights are compared after k + 2
optimizer steps (two reuse steps, a second refresh, one reuse from it).
"""

import copy

import pytest
import torch
from torch.func import functional_call

import tiny
from hf_sam import SAMConfig

K, RHO = 3, 0.5
STEPS = K + 2
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def flat_grad(model, names, w, mb):
    """Gradient of the model's mean loss on mb at the flat weights w (in the order of names)."""
    shapes = [p.shape for p in model.parameters()]
    ts = [t.view(s).clone().requires_grad_(True)
          for t, s in zip(torch.split(w, [s.numel() for s in shapes]), shapes)]
    loss = functional_call(model, dict(zip(names, ts)), (), mb)["loss"]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, ts)])


def reference(model, windows, alpha, optim, lr):
    """Final weights of plain-torch LookSAM (alpha None: reuse at the measured size)."""
    model = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    opt = (torch.optim.SGD(params, lr=lr, momentum=0.9) if optim == "sgd"
           else torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0))
    g_v = g_ref = None
    for t, window in enumerate(windows):
        w = torch.cat([p.detach().reshape(-1) for p in params])
        total = torch.zeros_like(w)
        for k, mb in enumerate(window):
            g = flat_grad(model, names, w, mb)
            if t % K == 0:
                g_s = flat_grad(model, names, w + RHO * g / g.norm(), mb)
                v = g_s - (g @ g_s) / (g @ g) * g
                g_v, g_ref = (v, g.norm()) if k == 0 else (g_v + v, g_ref + g.norm())
                d = g_s
            elif alpha is None:
                d = g + g.norm() / g_ref * g_v
            else:
                d = g + alpha * g.norm() / g_v.norm() * g_v
            total += d / len(window)
        offset = 0
        for p in params:
            p.grad = total[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


CASES = [(None, "sgd", 1), (None, "adamw_torch", 2), (0.7, "sgd", 1), (0.7, "adamw_torch", 2), (None, "sgd", 2)]


@pytest.mark.parametrize("alpha,optim,ga", CASES, ids=[f"alpha{a}-{o}-ga{g}" for a, o, g in CASES])
def test_against_plain_torch_looksam(tmp_path, alpha, optim, ga):
    lr = 0.1 if optim == "sgd" else 0.01
    torch.manual_seed(0)
    model = tiny.MLP(d_hidden=8)
    start = copy.deepcopy(model)
    sam = dict(sam_variant="looksam", sam_rho=RHO, sam_looksam_k=K)
    if alpha is not None:
        sam["sam_looksam_alpha"] = alpha
    kw = dict(optim_args="momentum=0.9") if optim == "sgd" else {}
    tiny.trainer(tmp_path, model, optim=optim, gradient_accumulation_steps=ga, max_steps=STEPS, learning_rate=lr,
                 logging_steps=1000, **sam, **kw).train()
    ref = reference(start, tiny.windows(tiny.Blobs(), 4, ga, STEPS), alpha, optim, lr)
    dev = max((p.detach() - ref[n]).abs().max().item() for n, p in model.named_parameters())
    moved = max((p.detach() - ref[n]).abs().max().item() for n, p in start.named_parameters())
    print(f"looksam alpha={alpha} {optim} ga{ga}: deviation {dev:.1e} (moved {moved:.2f})")
    assert moved > 1e-3
    assert dev <= TOL


def test_the_two_rules_differ(tmp_path):
    """The default is not the paper's rule under another name: the same run ends elsewhere."""
    ends = []
    for alpha in (None, 0.7):
        torch.manual_seed(0)
        model = tiny.MLP(d_hidden=8)
        sam = dict(sam_variant="looksam", sam_rho=RHO, sam_looksam_k=K)
        if alpha is not None:
            sam["sam_looksam_alpha"] = alpha
        tiny.trainer(tmp_path / str(alpha), model, max_steps=STEPS, optim_args="momentum=0.9", logging_steps=1000,
                     **sam).train()
        ends.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert (ends[0] - ends[1]).abs().max() > 1e-3


def test_alpha_setting():
    assert SAMConfig(variant="looksam").looksam_alpha is None  # the default: reuse at the measured size
    assert SAMConfig(variant="looksam", looksam_alpha=0.7).looksam_alpha == 0.7
    with pytest.raises(ValueError, match="looksam_alpha.*allowed: a finite number >= 0, or None"):
        SAMConfig(variant="looksam", looksam_alpha=float("nan"))
