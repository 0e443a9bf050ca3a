"""GCSAM: Gradient-Centralized SAM.

Paper: Mohamed Hassan, Aleksandar Vakanski, Boyu Zhang, Min Xian. "GCSAM: Gradient Centralized
Sharpness Aware Minimization", arXiv 2501.11584 (2025; IEEE Access). Code: mhassann22/GCSAM.
Gradient centralization: Yong, Huang, Hua, Zhang, "Gradient Centralization", ECCV 2020.

The ascent uses the centralized clean gradient:
    Phi_GC(g)_W = g_W - mean over all dims but the first (per output filter / row), for tensors
                  with 2 or more dims; 1-d tensors (biases, norms) are left as they are
    e = rho * Phi_GC(g) / (||Phi_GC(g)|| + eps);   descend with grad L(w + e)
`gcsam_descent=True` centralizes the descent gradient as well (the reading of some summaries of
the paper; the paper's equation centralizes the ascent). The norm is global over the perturbed
parameters; `adaptive` / `rho_scaling` shape Phi_GC(g) as they shape g in SAM.

Defaults: rho is the run's rho (the paper's CIFAR-10 runs use SAM's 0.05). rho = 0 is the stock
step. Cost: 2 passes, SAM's buffers (the centralization is in place).
"""

import torch

from .registry import Facts, register

GCSAM_PAPER = {
    "title": "GCSAM: Gradient Centralized Sharpness Aware Minimization",
    "authors": "Mohamed Hassan, Aleksandar Vakanski, Boyu Zhang, Min Xian",
    "venue": "arXiv 2025",
    "arxiv": "2501.11584",
    "bibtex": """@article{hassan2025gcsam,
  title={GCSAM: Gradient Centralized Sharpness Aware Minimization},
  author={Hassan, Mohamed and Vakanski, Aleksandar and Zhang, Boyu and Xian, Min},
  journal={arXiv preprint arXiv:2501.11584},
  year={2025},
  url={https://arxiv.org/abs/2501.11584}
}""",
}


def centralize_(grads, selected) -> None:
    """Subtract, in place, each multi-dim gradient's mean over all dims but the first (per output filter)."""
    with torch.no_grad():
        for x, keep in zip(grads, selected):
            if x is not None and keep and x.dim() > 1:
                x.sub_(x.mean(dim=tuple(range(1, x.dim())), keepdim=True))


def gcsam(ctx):
    g = ctx.grad()                                        # clean pass at w
    centralize_(g, ctx.selection.selected)                # Phi_GC(g), in g's storage
    e = ctx.ascent(g, inplace=True)                       # rho * Phi_GC(g) / ||Phi_GC(g)||
    del g
    if not ctx.config.gcsam_descent:
        ctx.grad(at=e, final=True, release=True)          # descend with grad L(w + e)
        return
    d = ctx.grad(at=e, release=True)
    centralize_(d, [True] * len(d))                       # Phi_GC(grad L(w + e))
    ctx.set_final(d)


GCSAM_FACTS = Facts(
    paper='Hassan, Vakanski, Zhang, Xian, *GCSAM: Gradient Centralized Sharpness Aware Minimization*,'
          ' arXiv 2025, [2501.11584](https://arxiv.org/abs/2501.11584)',
    settings='`rho`, `gcsam_descent` (False: centralize the ascent only)',
    passes='2',
    memory='1 (as SAM; centralized in place)',
)

register("gcsam", facts=GCSAM_FACTS, paper=GCSAM_PAPER)(gcsam)
