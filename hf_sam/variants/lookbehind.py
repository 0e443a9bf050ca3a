"""Lookbehind-SAM: k ascent/descent steps, then a step of the slow weights toward the fast ones.

Paper: Gonçalo Mordido, Pranshu Malviya, Aristide Baratin, Sarath Chandar. "Lookbehind-SAM: k
steps back, 1 step forward", ICML 2024, arXiv 2307.16704. Code: chandar-lab/Lookbehind-SAM,
lookbehind.py (`Lookbehind_SAM`) and example_cifar.py.

Outer step t from the slow weights phi (the fast weights w start at phi, the perturbed point
w' at phi), inner steps i = 1..k:
    e_i   = rho * grad L(w'_{i-1}) / ||grad L(w'_{i-1})||      ascent from the perturbed point
    w'_i  = w'_{i-1} + e_i                                     the perturbation accumulates
    w_i   = base_optimizer(w_{i-1}, grad L(w'_i))              descent of the fast weights
then  phi <- phi + alpha (w_k - phi),  w <- phi.

Form in hf_sam: each inner step is one optimizer step of the Trainer (its own batch: the paper's
"minibatch switching" form; the official example repeats one batch k times, which a Trainer step
cannot do). Optimizer step s is inner step i = s mod k + 1. The variant keeps phi and E = w' - phi
in its state and, per micro-batch, runs the clean pass at w' = phi + E and the descent pass at
w' + e (both as offsets from the fast weights w, put back exactly after the passes). With gradient
accumulation every micro-batch ascends from w'_{i-1} and E advances by the mean of their e (counted, so
hf_sam.SAM with several `accumulate` calls per step does the same). The
interpolation is due right after the k-th optimizer step, so it is applied at the start of the
next outer step, before its first pass: the weights change there by
w <- phi + alpha (w - phi) (the only step at which the weights after `training_step` differ from
those before it). A run that stops after an inner step ends on the fast weights (stop at a
multiple of k plus one step to end on the slow ones). phi and E live in the checkpoint
(sam_state.pt); a resumed run equals an uninterrupted one. Every trainable parameter has slow
weights; only the perturbed ones (`perturb`) ascend.

Defaults: k 5, alpha 0.5 (the official class defaults; the paper's CIFAR grids use k in {2, 5, 10}
and alpha in {0.2, 0.5, 0.8}); rho is the run's rho (the example's 0.5 is for ASAM; SAM runs use
0.05-0.2). k = 1 with alpha = 1 is SAM; rho = 0 is the stock step. Cost: 2 passes per micro-batch;
kept between steps: phi, E and the last step's sum of e (3 parameter-sized); transient: the offset, e and
the snapshot of w.
"""

import torch

from .. import ops
from .common import micro_step
from .registry import Facts, register

LOOKBEHIND_PAPER = {
    "title": "Lookbehind-SAM: k steps back, 1 step forward",
    "authors": "Gonçalo Mordido, Pranshu Malviya, Aristide Baratin, Sarath Chandar",
    "venue": "ICML 2024",
    "arxiv": "2307.16704",
    "bibtex": """@inproceedings{mordido2024lookbehind,
  title={Lookbehind-{SAM}: k steps back, 1 step forward},
  author={Mordido, Gon{\\c{c}}alo and Malviya, Pranshu and Baratin, Aristide and Chandar, Sarath},
  booktitle={Proceedings of the 41st International Conference on Machine Learning},
  year={2024},
  url={https://arxiv.org/abs/2307.16704}
}""",
}


def _start_outer_step(ctx) -> None:
    """phi <- phi + alpha (w - phi), w <- phi (after the first outer step); E <- 0."""
    state, weights = ctx.state, [p.detach() for p in ctx.params]
    slow = state.get("lookbehind_slow")
    if slow is not None:
        with torch.no_grad():
            torch._foreach_lerp_(ops.local(slow), ops.local(weights), ctx.config.lookbehind_alpha)
            ops.restore_(weights, slow)
    else:
        state["lookbehind_slow"] = ops.snapshot(weights)
    state["lookbehind_offset"] = [None] * len(ctx.params)


def lookbehind(ctx):
    cfg, state = ctx.config, ctx.state
    inner = ctx.global_step % cfg.lookbehind_k
    if micro_step(ctx) == 0:
        pending = state.pop("lookbehind_pending", None)              # E_{i-1} <- E_{i-2} + mean e (last step)
        count = state.pop("lookbehind_count", 1)
        if pending is not None:
            state["lookbehind_offset"] = [x if y is None else y.div_(count) if x is None else x.add_(y, alpha=1 / count)
                                          for x, y in zip(state["lookbehind_offset"], pending)]
        if inner == 0 or "lookbehind_slow" not in state:
            _start_outer_step(ctx)
    slow, offset = state["lookbehind_slow"], state["lookbehind_offset"]  # phi, E = w'_{i-1} - phi
    idx = [i for i, x in enumerate(offset) if x is not None]
    at = None
    if idx:                                                          # w' - w = phi + E - w
        at = [None] * len(ctx.params)
        with torch.no_grad():
            for i in idx:
                at[i] = slow[i] + offset[i] - ctx.params[i].detach()
    g = ctx.grad(at=at)                                              # pass at w'_{i-1}
    e = ctx.ascent(g, inplace=True)                                  # rho * g / ||g||
    del g
    pending = state.setdefault("lookbehind_pending", [None] * len(ctx.params))
    with torch.no_grad():
        new = list(at) if at is not None else [None] * len(ctx.params)
        for i, x in enumerate(e):
            if x is None:
                continue
            pending[i] = x.clone() if pending[i] is None else pending[i].add_(x)  # sum of e; / count next step
            new[i] = x if new[i] is None else new[i].add_(x)
    state["lookbehind_count"] = micro_step(ctx) + 1                  # micro-batches of this window so far
    del e, at
    ctx.grad(at=new, final=True, release=True)                       # descent gradient at w'_{i-1} + e


LOOKBEHIND_FACTS = Facts(
    paper='Mordido, Malviya, Baratin, Chandar, *Lookbehind-SAM: k steps back, 1 step forward*, ICML '
          '2024, [2307.16704](https://arxiv.org/abs/2307.16704)',
    settings='`rho`, `lookbehind_k` (5), `lookbehind_alpha` (0.5); one optimizer step per inner step',
    passes='2',
    memory="3 persistent (slow weights, accumulated perturbation E, the last step's sum of e; in the "
           'checkpoint) + offset, e and snapshot transient',
)

register("lookbehind", facts=LOOKBEHIND_FACTS, paper=LOOKBEHIND_PAPER)(lookbehind)
