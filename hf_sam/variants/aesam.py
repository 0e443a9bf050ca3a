"""AE-SAM: an adaptive policy that employs SAM only when the loss is sharp.

Weisen Jiang, Hansi Yang, Yu Zhang, James T. Kwok. "An Adaptive Policy to Employ Sharpness-Aware
Minimization", ICLR 2023, arXiv 2304.14647. No official code was located; the rule follows hf_sam's
algorithm reference (section 19, a third-party transcription):

    every micro-batch: clean pass, s_t = ||g_t||^2 (unscaled global norm over the selected params)
    mu_t      = delta * mu_{t-1}      + (1 - delta) * s_t
    sigma2_t  = delta * sigma2_{t-1}  + (1 - delta) * (s_t - mu_t)^2
    c_t       = (t/T) * lambda1 + (1 - t/T) * lambda2         (t = global_step, T = max_steps)
    s_t >= mu_t + c_t * sqrt(sigma2_t):  SAM step (ascent, second pass at w + e)
    otherwise:                           plain step with g_t (no second pass)

mu_0 = sigma2_0 = 0. Defaults (UNVERIFIED, no official code): delta = 0.9, lambda1 = -1, lambda2 = 1, so
c_t falls from 1 to -1 and SAM is used more often late in training (about 16% of the steps at the
start and 84% at the end for Gaussian-distributed norms). lambda1 = lambda2 = -inf-like (e.g. -1e9) is
SAM on every step; +1e9 is never SAM (the stock step).

Multi-process runs: the squared norm is averaged across processes before the statistics are updated,
so every process holds the same statistics and takes the same decision (different decisions would
run different numbers of backward passes and hang DDP). The decision costs one host sync per
micro-batch. A non-finite norm (fp16 overflow) leaves the statistics unchanged and takes the plain
step (the scaler then skips it). Statistics are saved with checkpoints (sam_state.pt).

Cost: 1 + P(SAM) passes; +1 buffer on SAM steps; four scalars of state.
"""

import math

import torch

from .. import ops
from .registry import Facts, register

AESAM_PAPER = {
    "title": "An Adaptive Policy to Employ Sharpness-Aware Minimization",
    "authors": "Weisen Jiang, Hansi Yang, Yu Zhang, James T. Kwok",
    "venue": "ICLR 2023",
    "arxiv": "2304.14647",
    "bibtex": """@inproceedings{jiang2023adaptive,
  title={An Adaptive Policy to Employ Sharpness-Aware Minimization},
  author={Jiang, Weisen and Yang, Hansi and Zhang, Yu and Kwok, James T.},
  booktitle={International Conference on Learning Representations},
  year={2023},
  url={https://arxiv.org/abs/2304.14647}
}""",
}


def decide(ctx, sq: float) -> bool:
    """Update the running statistics with s_t = sq and return whether this micro-batch takes a SAM step."""
    cfg, st = ctx.config, ctx.state
    st["aesam_steps"] = st.get("aesam_steps", 0) + 1
    if not math.isfinite(sq):
        return False
    delta = float(cfg.aesam_delta)
    mu = delta * st.get("aesam_mean", 0.0) + (1.0 - delta) * sq
    var = delta * st.get("aesam_var", 0.0) + (1.0 - delta) * (sq - mu) ** 2
    st["aesam_mean"], st["aesam_var"] = mu, var
    total = ctx.max_steps or 0
    frac = min(ctx.global_step / total, 1.0) if total > 0 else 0.0
    c = frac * cfg.aesam_lambda1 + (1.0 - frac) * cfg.aesam_lambda2
    use_sam = sq >= mu + c * math.sqrt(var)
    st["aesam_sam_steps"] = st.get("aesam_sam_steps", 0) + int(use_sam)
    return use_sam


def aesam(ctx):
    g = ctx.grad()                                            # clean pass at w (always needed)
    gs = [x for x, s in zip(g, ctx.selection.selected) if x is not None and s]
    sq = (ops.global_norm(gs) * ctx.grad_unit()) ** 2 if gs else torch.zeros(())
    sq = ctx.mean_over_processes(sq)                          # every process: the same statistics
    if not decide(ctx, float(sq)):                            # same decision on every process
        ctx.set_final(g)                                      # plain step with the clean gradient
        return
    e = ctx.ascent(g, inplace=True)
    del g, gs
    ctx.grad(at=e, final=True, release=True)                  # SAM: descent at w + e


AESAM_FACTS = Facts(
    paper="Jiang, Yang, Zhang, Kwok, *An Adaptive Policy to Employ Sharpness-Aware Minimization*, ICLR 2023, "
          "[2304.14647](https://arxiv.org/abs/2304.14647)",
    settings="`rho`, `aesam_delta` (0.9), `aesam_lambda1` (-1), `aesam_lambda2` (1) — defaults unverified",
    passes="1 + P(SAM)",
    memory="1 on SAM steps; 4 scalars of state",
)


register("aesam", passes=2, paper=AESAM_PAPER, facts=AESAM_FACTS)(aesam)
