"""ZSharp: SAM with per-layer z-score filtering of the ascent gradient.

Paper: Juyoung (Vincent-Daniel) Yun. "Sharpness-Aware Minimization with Z-Score Gradient
Filtering for Neural Networks", arXiv 2505.02369 (2025; NeurIPS 2025 workshop).

For every perturbed tensor l of the clean gradient g:
    z_j   = (g_j - mean_l(g)) / std_l(g)
    m_j   = 1 if |z_j| >= q_l, the Q_p-percentile of |z| over the tensor, else 0
    g~    = m * g
    e     = rho * g~ / (||g~|| + eps);   descend with grad L(w + e)
Only the ascent is filtered; the descent is SAM's. The percentile is taken as an order statistic:
q_l is the k-th smallest |z| with k = max(1, ceil(Q_p * n_l)), so about (1 - Q_p) of each tensor is
kept (ties at q_l are kept; an all-equal tensor keeps every entry). Since the mask compares |z| with
its own percentile, std_l cancels: m_j = [|g_j - mean_l| >= k-th smallest |g - mean_l|].
The norm is global over the perturbed parameters.

Defaults: Q_p = 0.95 (the top 5%; the value given for the paper's CIFAR/Tiny-ImageNet runs,
unverified against its tables); rho is the run's rho (0.05 as SAM). Q_p = 0 keeps everything (SAM);
rho = 0 is the stock step. Cost: 2 passes, SAM's buffers plus one transient |g - mean| per tensor.
"""

import math

import torch

from .registry import Facts, register

ZSHARP_PAPER = {
    "title": "Sharpness-Aware Minimization with Z-Score Gradient Filtering for Neural Networks",
    "authors": "Juyoung Yun",
    "venue": "arXiv 2025",
    "arxiv": "2505.02369",
    "bibtex": """@article{yun2025zsharp,
  title={Sharpness-Aware Minimization with Z-Score Gradient Filtering for Neural Networks},
  author={Yun, Juyoung},
  journal={arXiv preprint arXiv:2505.02369},
  year={2025},
  url={https://arxiv.org/abs/2505.02369}
}""",
}


def zscore_filter_(grads, selected, percentile: float) -> None:
    """Zero, in place, the entries of each selected tensor whose |z-score| is below its Q_p-percentile."""
    if percentile <= 0:
        return
    with torch.no_grad():
        for x, keep in zip(grads, selected):
            if x is None or not keep or x.numel() < 2:
                continue
            dev = (x.float() - x.float().mean()).abs_()
            k = max(1, math.ceil(percentile * dev.numel()))
            threshold = dev.reshape(-1).kthvalue(k).values
            x.mul_((dev >= threshold).to(x.dtype))


def zsharp(ctx):
    g = ctx.grad()                                                   # clean pass at w
    zscore_filter_(g, ctx.selection.selected, float(ctx.config.zsharp_percentile))  # g~ = m * g
    e = ctx.ascent(g, inplace=True)                                  # rho * g~ / ||g~||
    del g
    ctx.grad(at=e, final=True, release=True)                         # descend with grad L(w + e)


ZSHARP_FACTS = Facts(
    paper='Yun, *Sharpness-Aware Minimization with Z-Score Gradient Filtering for Neural Networks*, '
          'arXiv 2025, [2505.02369](https://arxiv.org/abs/2505.02369)',
    settings='`rho`, `zsharp_percentile` (0.95, unverified)',
    passes='2',
    memory='1 (as SAM) + one transient tensor-sized buffer',
)

register("zsharp", facts=ZSHARP_FACTS, paper=ZSHARP_PAPER)(zsharp)
