"""Shared by the probe scripts: a tiny MLP (uneven shapes), deterministic data, single-process SAM references.

The reference is written from the SAM equations, independent of any sharding code:
  per micro-batch: g = grad L_B(w) on the ascent batch B; e = rho * g / (||g|| + eps);
  descent gradient = grad L_b(w + e) on the micro-batch b (for each chunk b of the ascent group).
Ascent groups: 'global' = all ranks' data; 'group' = the ranks of one shard group; 'device' = one rank.
The descent gradient is always the mean over all ranks (and over GA micro-batches), then SGD or AdamW.
"""
import copy
import os
import time

import torch

IN, HID, OUT = 7, 13, 5  # 13x7 = 91 and 13 elements: shards unevenly over 2 ranks
RHO, LR, EPS = 0.5, 0.1, 1e-12


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(IN, HID)
        self.fc2 = torch.nn.Linear(HID, OUT)

    def forward(self, x, y=None):
        out = self.fc2(torch.tanh(self.fc1(x)))
        if y is None:
            return out
        return torch.nn.functional.mse_loss(out, y)


def tiny(seed=0):
    torch.manual_seed(seed)
    return MLP()


def data(step, micro, world, per_rank=4):
    """Global batch of (step, micro-batch): world*per_rank rows; rank r takes rows [r*per_rank, (r+1)*per_rank)."""
    g = torch.Generator().manual_seed(1000 + 37 * step + micro)
    x = torch.randn(world * per_rank, IN, generator=g)
    y = torch.randn(world * per_rank, OUT, generator=g)
    return x, y


def rank_slice(t, rank, per_rank=4):
    return t[rank * per_rank:(rank + 1) * per_rank]


def make_opt(params, kind):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=LR)
    return torch.optim.AdamW(params, lr=LR * 0.1, weight_decay=0.01)


def sam_reference(init, steps, world, mode, opt_kind="sgd", ga=1, group_size=None, per_rank=4, rho=RHO,
                  start_step=0, model=None, opt=None):
    """mode: global | group | device | plain (no SAM). group_size: ranks per ascent group ('group' mode)."""
    model = copy.deepcopy(init) if model is None else model
    params = list(model.parameters())
    opt = make_opt(params, opt_kind) if opt is None else opt
    gs = {"global": world, "group": group_size, "device": 1, "plain": world}[mode]
    for s in range(start_step, start_step + steps):
        total = [torch.zeros_like(p) for p in params]
        for m in range(ga):
            x, y = data(s, m, world, per_rank)
            for g0 in range(0, world, gs):
                xs, ys = x[g0 * per_rank:(g0 + gs) * per_rank], y[g0 * per_rank:(g0 + gs) * per_rank]
                if mode == "plain":
                    d = torch.autograd.grad(model(xs, ys), params)
                else:
                    g = torch.autograd.grad(model(xs, ys), params)
                    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in g)).float()
                    saved = [p.detach().clone() for p in params]
                    with torch.no_grad():
                        for p, t in zip(params, g):
                            p.add_(rho * t / (norm + EPS))
                    d = torch.autograd.grad(model(xs, ys), params)
                    with torch.no_grad():
                        for p, t in zip(params, saved):
                            p.copy_(t)
                # group's loss is the mean over its rows: weight gs/world in the all-rank mean
                total = [a + b * (gs / world) / ga for a, b in zip(total, d)]
        for p, t in zip(params, total):
            p.grad = t
        opt.step()
        opt.zero_grad()
    return model, opt


def max_dev(full_params, ref_model):
    return max((a.detach().float() - b.detach().float()).abs().max().item()
               for a, b in zip(full_params, ref_model.parameters()))


class Counter:
    """Counts torch.distributed collectives (FSDP2 and DeepSpeed call them through the module at call time)."""
    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
             "broadcast", "all_gather_single", "reduce_scatter_single", "_reduce_scatter_base", "_all_gather_base")

    def __init__(self):
        import torch.distributed as dist
        self.counts = {}
        for n in self.NAMES:
            fn = getattr(dist, n, None)
            if fn is None:
                continue

            def wrap(fn=fn, n=n):
                def w(*a, **k):
                    self.counts[n] = self.counts.get(n, 0) + 1
                    return fn(*a, **k)
                return w
            setattr(dist, n, wrap())

    def snap(self):
        return dict(self.counts)

    def since(self, before):
        return {k: v - before.get(k, 0) for k, v in self.counts.items() if v - before.get(k, 0)}


T0 = time.time()


def elapsed():
    return round(time.time() - T0, 2)
