"""SSAM: Sparse SAM (SSAM-F with a Fisher mask, SSAM-D with a dynamic mask).

Paper: Peng Mi, Li Shen, Tianhe Ren, Yiyi Zhou, Xiaoshuai Sun, Rongrong Ji, Dacheng Tao. "Make
Sharpness-Aware Minimization Stronger: A Sparsified Perturbation Approach", NeurIPS 2022,
arXiv 2210.05177. Reference: Mi-Peng/Sparse-Sharpness-Aware-Minimization, solver/sam.py
(`SSAMF`, `SSAMD`).

    e = rho * (g * mask) / (||g|| + eps)          descend with grad L(w + e)
The norm is over the *unmasked* g (as in the code), so ||e|| <= rho. The binary mask keeps
(1 - sparsity) of the perturbed coordinates, chosen globally over all perturbed tensors.

Mask refresh every `ssam_update_interval` optimizer steps (global_step % interval == 0), on the
first micro-batch of that step:
- fisher (SSAM-F): F = sum over N_s samples of (grad l_n(w))^2, from single-sample passes on the
  first N_s = min(ssam_fisher_samples, n) samples of the current micro-batch (the official code
  draws N_s random training samples); mask = top int(N (1 - s)) entries of F. The passes run after
  the clean pass, in train mode, with the global RNG and BatchNorm statistics put back afterwards,
  without touching `.grad`. The new mask is used from this step on (the official code starts from
  an all-zero mask, i.e. a plain first step, and uses a new mask from the next step).
- dynamic (SSAM-D): the mask starts random with N - ceil(N s) live entries; at a refresh, with the
  drop rate d_t = d (1 + cos(pi t / T)) / 2 (t = global_step, T = max_steps): keep the top
  int((N - N s)(1 - d_t)) live entries by |g| (this micro-batch's clean gradient), regrow
  int(min((N - N s) d_t, N s)) dead entries at random. The ascent of the refresh micro-batch uses
  the previous mask (official order: update after the ascent).
Random draws come from a private generator seeded with `args.seed` (state saved), over the
perturbed tensors concatenated in the optimizer's parameter order.

The mask (bool, one byte per coordinate), the generator and the step of the last refresh are
saved in the checkpoint. sparsity = 0 is SAM (no mask is built).

Defaults: sparsity 0.5, fisher, N_s 16 (README CIFAR: s 0.5, N_s 16, refresh every epoch; CLI:
s 0.2, N_s 1024, every 5 epochs), drop rate 0.5, interval 100 optimizer steps. Cost: 2 passes
(the dense mask brings no speed-up) + N_s single-sample passes per Fisher refresh; +1 mask,
+1 fp32 Fisher buffer during a refresh.
"""

import math
import warnings

import torch

from .. import ops
from ..losses import batch_size, select_samples
from .esam import generator
from .gsam import pick
from .registry import register

PAPER = {
    "title": "Make Sharpness-Aware Minimization Stronger: A Sparsified Perturbation Approach",
    "authors": "Peng Mi, Li Shen, Tianhe Ren, Yiyi Zhou, Xiaoshuai Sun, Rongrong Ji, Dacheng Tao",
    "venue": "NeurIPS 2022",
    "arxiv": "2210.05177",
    "bibtex": """@inproceedings{mi2022make,
  title={Make Sharpness-Aware Minimization Stronger: A Sparsified Perturbation Approach},
  author={Mi, Peng and Shen, Li and Ren, Tianhe and Zhou, Yiyi and Sun, Xiaoshuai and Ji, Rongrong and Tao, Dacheng},
  booktitle={Advances in Neural Information Processing Systems},
  year={2022},
  url={https://arxiv.org/abs/2210.05177}
}""",
}


def _top_mask(scores, keep, shapes):
    """A flat bool mask with the `keep` largest scores set, split back into tensors of `shapes`."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        flat[torch.topk(scores, keep, sorted=False).indices] = True
    return [x.view(s) for x, s in zip(torch.split(flat, [math.prod(s) for s in shapes]), shapes)]


def _flat(tensors):
    return torch.cat([t.reshape(-1).float() for t in tensors])


def _fisher(ctx, params):
    """sum_n grad(l_n)^2 over single-sample passes on the current micro-batch (fp32)."""
    trainer, model = ctx.trainer, ctx.model
    n = batch_size(ctx.inputs)
    count = min(ctx.config.ssam_fisher_samples, n)
    if count < ctx.config.ssam_fisher_samples and not getattr(trainer, "_ssam_warned_samples", False):
        trainer._ssam_warned_samples = True
        warnings.warn(f"ssam_fisher_samples={ctx.config.ssam_fisher_samples} exceeds the micro-batch size {n}; "
                      f"the Fisher mask uses the {count} samples of the micro-batch.", stacklevel=3)
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    bn = ops.snapshot(ctx.selection.batchnorms)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = [torch.cuda.current_device()] if cuda else []
    try:
        with torch.random.fork_rng(devices=devices), trainer.accelerator.no_sync(model):
            for j in range(count):
                sample = trainer._prepare_inputs(select_samples(ctx.inputs, [j]))
                with trainer.compute_loss_context_manager():
                    loss = trainer.compute_loss(model, sample)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for f, gr in zip(fisher, grads):
                    if gr is not None:
                        f.addcmul_(gr.float(), gr.float())
    finally:
        ops.restore_(ctx.selection.batchnorms, bn)
    return fisher


def _refresh_due(ctx):
    state, step = ctx.state, ctx.global_step
    return state.get("ssam_mask") is None or (step % ctx.config.ssam_update_interval == 0
                                              and state.get("ssam_step") != step)


def _dynamic_update(ctx, mask, g, idx, gen):
    """SSAM-D drop-and-grow from the clean gradient g (official `update_mask`)."""
    cfg, trainer = ctx.config, ctx.trainer
    params = pick(ctx.params, idx)
    shapes = [tuple(p.shape) for p in params]
    live = _flat(pick(mask, idx))
    total = live.numel()
    t, horizon = trainer.state.global_step, max(trainer.state.max_steps or 1, 1)
    rate = cfg.ssam_drop_rate * (1 + math.cos(math.pi * t / horizon)) / 2
    dense = total - total * cfg.ssam_sparsity
    grads = [g[i] if g[i] is not None else torch.zeros_like(ctx.params[i]) for i in idx]
    death = (_flat(grads).abs() + 1e-7) * live
    kept = _top_mask(death, int(dense * (1 - rate)), shapes)
    growth = (torch.rand(total, generator=gen).to(live.device) + 1e-7) * (1 - live)
    grown = _top_mask(growth, int(min(dense * rate, total * cfg.ssam_sparsity)), shapes)
    return [a | b for a, b in zip(kept, grown)]


def ssam(ctx):
    cfg, state = ctx.config, ctx.state
    g = ctx.grad()                                             # clean pass at w
    if cfg.ssam_sparsity == 0:
        e = ctx.ascent(g, inplace=True)                        # every coordinate: SAM
        del g
        ctx.grad(at=e, final=True, release=True)
        return
    idx = [i for i, s in enumerate(ctx.selection.selected) if s]
    params = pick(ctx.params, idx)
    shapes = [tuple(p.shape) for p in params]
    total = sum(p.numel() for p in params)
    refresh = _refresh_due(ctx)
    new_mask = None
    if cfg.ssam_mask == "fisher":
        if refresh:
            fisher = _flat(_fisher(ctx, params))
            new_mask = _top_mask(fisher, int(total * (1 - cfg.ssam_sparsity)), shapes)
            del fisher
    else:
        gen = generator(state, "ssam_rng", ctx.trainer.args.seed)
        if state.get("ssam_mask") is None:                     # random start: N - ceil(N s) live entries
            scores = torch.rand(total, generator=gen).to(params[0].device)
            start = _top_mask(scores, total - math.ceil(total * cfg.ssam_sparsity), shapes)
            state["ssam_mask"] = [None] * len(ctx.params)
            for i, m in zip(idx, start):
                state["ssam_mask"][i] = m
        if refresh:                                            # drop by |g|, regrow at random
            new_mask = _dynamic_update(ctx, state["ssam_mask"], g, idx, gen)
        state["ssam_rng"] = gen.get_state()
    if new_mask is not None and cfg.ssam_mask == "fisher":     # Fisher: the new mask serves this step
        state["ssam_mask"] = [None] * len(ctx.params)
        for i, m in zip(idx, new_mask):
            state["ssam_mask"][i] = m
    if refresh:
        state["ssam_step"] = ctx.global_step
    mask = state["ssam_mask"]
    e = ctx.ascent(g, inplace=True)                            # rho * g / ||g|| (norm of the unmasked g)
    on = [i for i in idx if e[i] is not None and mask[i] is not None]
    if on:
        torch._foreach_mul_(pick(e, on), [mask[i].to(e[i].device) for i in on])   # ... * mask
    if new_mask is not None and cfg.ssam_mask == "dynamic":    # SSAM-D: the update follows the ascent
        for i, m in zip(idx, new_mask):
            mask[i] = m
    del g
    ctx.grad(at=e, final=True, release=True)                   # descent at w + e


register("ssam", trainer_only=True, paper=PAPER)(ssam)
