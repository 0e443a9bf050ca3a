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
Random draws (SSAM-D) come from the micro-batch's private generator (hf_sam.variants.common.Noise,
the same on every process), over the perturbed tensors concatenated in the optimizer's parameter
order. `fisher_mask` and `dynamic_mask` are the two mask rules; `ssam` is the step around them.

The mask (bool, one byte per coordinate) and the step of the last refresh are saved in the
checkpoint. sparsity = 0 is SAM (no mask is built). SSAM-F needs the Trainer (its single-sample
passes go through the Trainer's loss), so hf_sam.SAM refuses `ssam`.

Defaults: sparsity 0.5, fisher, N_s 16 (README CIFAR: s 0.5, N_s 16, refresh every epoch; CLI:
s 0.2, N_s 1024, every 5 epochs), drop rate 0.5, interval 100 optimizer steps. Cost: 2 passes
(the dense mask brings no speed-up) + N_s single-sample passes per Fisher refresh; +1 mask,
+1 fp32 Fisher buffer during a refresh.
"""

import math
import warnings

import torch

from ..losses import batch_size, select_samples
from .common import Noise, host_loss, pick, place
from .registry import Facts, register

SSAM_PAPER = {
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
    """sum_n grad(l_n)^2 over single-sample passes on the current micro-batch (fp32).

    The passes run through the Trainer's loss on sub-batches, without gradient communication, with the
    global RNG and the BatchNorm statistics put back afterwards and `.grad` untouched.
    """
    trainer, model = ctx.trainer, ctx.model
    n = batch_size(ctx.inputs)
    count = min(ctx.config.ssam_fisher_samples, n)
    if count < ctx.config.ssam_fisher_samples and "ssam_fisher_samples" not in ctx.front.flags:
        ctx.front.flags.add("ssam_fisher_samples")
        warnings.warn(f"ssam_fisher_samples={ctx.config.ssam_fisher_samples} exceeds the micro-batch size {n}; "
                      f"the Fisher mask uses the {count} samples of the micro-batch.", stacklevel=4)
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    with ctx.side_pass():
        for j in range(count):
            loss = host_loss(trainer, model, select_samples(ctx.inputs, [j]))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for f, gr in zip(fisher, grads):
                if gr is not None:
                    f.addcmul_(gr.float(), gr.float())
    return fisher


def _refresh_due(ctx):
    """Whether this micro-batch refreshes the mask (first use, or the first micro-batch of a due step)."""
    state, step = ctx.state, ctx.global_step
    due = state.get("ssam_mask") is None or (step % ctx.config.ssam_update_interval == 0
                                             and state.get("ssam_step") != step)
    if due:
        state["ssam_step"] = step
    return due


def _dynamic_update(ctx, mask, g, idx, noise):
    """SSAM-D drop-and-grow from the clean gradient g (official `update_mask`)."""
    cfg = ctx.config
    params = pick(ctx.params, idx)
    shapes = [tuple(p.shape) for p in params]
    live = _flat(pick(mask, idx))
    total = live.numel()
    t, horizon = ctx.global_step, max(ctx.max_steps or 1, 1)
    rate = cfg.ssam_drop_rate * (1 + math.cos(math.pi * t / horizon)) / 2
    dense = total - total * cfg.ssam_sparsity
    grads = [g[i] if g[i] is not None else torch.zeros_like(ctx.params[i]) for i in idx]
    death = (_flat(grads).abs() + 1e-7) * live
    kept = _top_mask(death, int(dense * (1 - rate)), shapes)
    growth = (noise.rand(total).to(live.device) + 1e-7) * (1 - live)
    grown = _top_mask(growth, int(min(dense * rate, total * cfg.ssam_sparsity)), shapes)
    return [a | b for a, b in zip(kept, grown)]


def fisher_mask(ctx, g, idx):
    """SSAM-F: at a refresh, the top (1 - sparsity) Fisher scores; the new mask serves this step.

    Returns (the mask of this ascent, None).
    """
    if _refresh_due(ctx):
        params = pick(ctx.params, idx)
        fisher = _flat(_fisher(ctx, params))
        keep = int(fisher.numel() * (1 - ctx.config.ssam_sparsity))
        ctx.state["ssam_mask"] = place(idx, _top_mask(fisher, keep, [tuple(p.shape) for p in params]),
                                       len(ctx.params))
    return ctx.state["ssam_mask"], None


def dynamic_mask(ctx, g, idx):
    """SSAM-D: a random start; at a refresh, drop by |g| and regrow at random.

    Returns (the mask of this ascent, the refreshed mask that replaces it after the ascent or None).
    """
    refresh = _refresh_due(ctx)
    noise = Noise(ctx, per_process=False)
    if ctx.state.get("ssam_mask") is None:                     # random start: N - ceil(N s) live entries
        params = pick(ctx.params, idx)
        total = sum(p.numel() for p in params)
        scores = noise.rand(total).to(params[0].device)
        start = _top_mask(scores, total - math.ceil(total * ctx.config.ssam_sparsity),
                          [tuple(p.shape) for p in params])
        ctx.state["ssam_mask"] = place(idx, start, len(ctx.params))
    mask = ctx.state["ssam_mask"]
    return mask, (_dynamic_update(ctx, mask, g, idx, noise) if refresh else None)


MASKS = {"fisher": fisher_mask, "dynamic": dynamic_mask}


def ssam(ctx):
    g = ctx.grad()                                             # clean pass at w
    if ctx.config.ssam_sparsity == 0:
        e = ctx.ascent(g, inplace=True)                        # every coordinate: SAM
        del g
        ctx.grad(at=e, final=True, release=True)
        return
    idx = [i for i, s in enumerate(ctx.selection.selected) if s]
    mask, update = MASKS[ctx.config.ssam_mask](ctx, g, idx)
    e = ctx.ascent(g, inplace=True)                            # rho * g / ||g|| (norm of the unmasked g)
    on = [i for i in idx if e[i] is not None and mask[i] is not None]
    if on:
        torch._foreach_mul_(pick(e, on), [mask[i].to(e[i].device) for i in on])   # ... * mask
    if update is not None:                                     # SSAM-D: the update follows the ascent
        for i, m in zip(idx, update):
            mask[i] = m
    del g
    ctx.grad(at=e, final=True, release=True)                   # descent at w + e


SSAM_FACTS = Facts(
    paper="Mi et al., *Make Sharpness-Aware Minimization Stronger: A Sparsified Perturbation Approach*, NeurIPS "
          "2022, arXiv 2210.05177",
    settings="`ssam_sparsity` (0.5), `ssam_mask` (fisher | dynamic), `ssam_update_interval` (100 steps), "
             "`ssam_fisher_samples` (16), `ssam_drop_rate` (0.5, dynamic)",
    passes="2, + N_s single-sample passes per Fisher refresh (measured 2.8 with N_s = 4 and a refresh every 5 "
           "steps)",
    memory="mask (1 byte per coordinate, in the checkpoint); fp32 Fisher buffer during a refresh",
)


register("ssam", trainer_only=True, paper=SSAM_PAPER, facts=SSAM_FACTS)(ssam)
