"""LookSAM: SAM's extra pass only every k-th step, reusing its direction in between.

Paper: Yong Liu, Siqi Mai, Xiangning Chen, Cho-Jui Hsieh, Yang You. "Towards Efficient and
Scalable Sharpness-Aware Minimization", CVPR 2022, arXiv 2203.02714. No official code; the form
follows the paper's algorithm and MarlonBecker/MSAM optimizer/looksam.py (global vectors).
(rollovd/LookSAM resets the weights to a stale copy on every step: not used as a reference.)

On optimizer steps with global_step % k == 0 (refresh), per micro-batch:
    e   = rho * g / (||g|| + eps);  g_s = grad L(w + e);  descend with g_s
    g_v = g_s - ||g_s|| cos(g, g_s) g / ||g||  =  g_s - (g . g_s) / ||g||^2 g   (stored)
Every other step, one pass, with one of two rules (`looksam_alpha`):
    looksam_alpha a number (the paper's rule):
        descend with g + alpha * (||g|| / ||g_v||) * g_v
    looksam_alpha None (default; reuse at the measured size):
        descend with g + (||g|| / ||g_refresh||) * g_v
The paper's rule gives the reused term the norm alpha * ||g|| whatever SAM measured: at rho 0.05
on the default tiny ViT SAM's own orthogonal part is 0.04-0.11 ||g|| after the first steps, so
alpha 0.7 applies it 7-35x harder than SAM does (a SAM with a much larger radius) and the ViT stays
at chance with AdamW (10.4%, 3 seeds). The default keeps g_v at the size SAM measured at the
refresh, relative to the clean gradient norm ||g_refresh|| of that step, and scales it with the
current ||g||: on refresh steps both rules descend with SAM's g_s, and between refreshes the
default adds what SAM added at the refresh, per unit of gradient norm (numbers in the README).
Norms and inner products are global over the perturbed parameters; a trainable parameter that is
not perturbed descends with its own gradient. With gradient accumulation the stored g_v is the
sum of the refresh step's micro-batch g_v and ||g_refresh|| the sum of their clean-gradient norms
(each micro-batch then adds its share, ||g|| / sum ||g_refresh||, of g_v; with one micro-batch
this is the rule above). g_v (and ||g_refresh||) are per device and live in the checkpoint, with
the step they were taken at; a run without a stored g_v (first step, or `interval`/`start` gates
that skipped the refresh step, or a g_v stored without ||g_refresh||) refreshes first.

Defaults: k 5, alpha None (measured size). Paper rule: community k 10, alpha 0.7, rho 0.1; MSAM
repo class: k 5, alpha 0.2, rho 0.3; unverified against the paper. Cost: 2 passes on refresh
steps, 1 pass otherwise (1 + 1/k on average; no RNG snapshot on the one-pass steps, `one_pass_now`);
+1 gradient-sized buffer (g_v) kept between steps,
+2 transient at refresh.
"""

import torch

from .. import ops
from .common import orthogonal_part, perturbed, pick, place
from .registry import Facts, register

LOOKSAM_PAPER = {
    "title": "Towards Efficient and Scalable Sharpness-Aware Minimization",
    "authors": "Yong Liu, Siqi Mai, Xiangning Chen, Cho-Jui Hsieh, Yang You",
    "venue": "CVPR 2022",
    "arxiv": "2203.02714",
    "bibtex": """@inproceedings{liu2022towards,
  title={Towards Efficient and Scalable Sharpness-Aware Minimization},
  author={Liu, Yong and Mai, Siqi and Chen, Xiangning and Hsieh, Cho-Jui and You, Yang},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition},
  pages={12360--12370},
  year={2022},
  url={https://arxiv.org/abs/2203.02714}
}""",
}


def _refresh(ctx):
    """A refresh (two passes) on this step: every k-th step, and whenever no usable g_v is stored."""
    cfg, state = ctx.config, ctx.state
    stale = cfg.looksam_alpha is None and "looksam_gnorm" not in state  # g_v stored without its size
    return state.get("looksam_gv") is None or stale or ctx.global_step % cfg.looksam_k == 0


def looksam(ctx):
    cfg, state = ctx.config, ctx.state
    step = ctx.global_step
    g_v = state.get("looksam_gv")
    g = ctx.grad()                                            # clean pass at w
    if _refresh(ctx):
        e = ctx.ascent(g)                                     # rho * g / ||g|| (g kept)
        g_s = ctx.grad(at=e, release=True)                    # pass at w + e (e freed once applied)
        idx = perturbed(ctx, g, g_s)
        gc = pick(g, idx)
        new = orthogonal_part(pick(g_s, idx), gc, cfg.eps)    # g_v = g_s - (g . g_s) / ||g||^2 g
        ops.zero_nonfinite_(new)                              # an fp16 overflow must not stick in g_v
        g_norm = ops.global_norm(gc)                          # ||g_refresh|| (the measured-size rule)
        g_norm = torch.where(torch.isfinite(g_norm), g_norm, torch.zeros_like(g_norm))
        if g_v is not None and state.get("looksam_step") == step:
            for i, x in zip(idx, new):                        # later micro-batch of the refresh step
                g_v[i] = x if g_v[i] is None else g_v[i].add_(x)
            state["looksam_gnorm"] = state["looksam_gnorm"] + g_norm
        else:
            g_v = place(idx, new, len(ctx.params))
            state["looksam_gv"], state["looksam_step"], state["looksam_gnorm"] = g_v, step, g_norm
        ctx.set_final(g_s)                                    # descend with g_s
        return
    idx = perturbed(ctx, g, g_v)
    if idx:
        gc, gv = pick(g, idx), pick(g_v, idx)
        if cfg.looksam_alpha is None:                         # g + ||g|| / ||g_refresh|| g_v
            scale = ops.global_norm(gc) / (state["looksam_gnorm"] + cfg.eps)
        else:                                                 # the paper's g + alpha ||g|| / ||g_v|| g_v
            scale = cfg.looksam_alpha * ops.global_norm(gc) / (ops.global_norm(gv) + cfg.eps)
        torch._foreach_add_(gc, torch._foreach_mul(gv, scale))
    ctx.set_final(g)                                          # one pass in all


LOOKSAM_FACTS = Facts(
    paper="Liu et al., *Towards Efficient and Scalable Sharpness-Aware Minimization*, CVPR 2022, arXiv 2203.02714",
    settings="`looksam_k` (5), `looksam_alpha` (None: g_v reused at the size SAM measured at the refresh; a "
             "number: the paper's rule, community value 0.7; see Known limitations)",
    passes="2 every k-th step, 1 otherwise (measured 1.2 at k = 5)",
    memory="+1 persistent (g_v, in the checkpoint); +1 transient on refresh steps",
)


register("looksam", paper=LOOKSAM_PAPER, facts=LOOKSAM_FACTS, one_pass_now=lambda ctx: not _refresh(ctx))(looksam)
