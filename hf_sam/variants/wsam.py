"""WSAM: Weighted SAM, sharpness as a weighted regularisation term.

Paper: Yun Yue, Jiadi Jiang, Zhiling Ye, Ning Gao, Yongchao Liu, Ke Zhang. "Sharpness-Aware
Minimization Revisited: Weighted Sharpness as a Regularization Term", KDD 2023, arXiv 2305.15817
(code: intelligent-machine-learning/atorch, atorch/optimizers).

The objective weights SAM's sharpness L(w + e) - L(w) by gamma / (1 - gamma):
    L_WSAM(w) = L(w) + gamma / (1 - gamma) * (L(w + e) - L(w)),   e = rho * g / (||g|| + eps)
so, with g = grad L(w), g~ = grad L(w + e) and a = gamma / (1 - gamma), the descent direction is
    d = g + a * (g~ - g) = (1 - a) * g + a * g~
gamma = 0.5 (a = 1) is SAM, gamma = 0 the stock step (taken in one pass); gamma -> 1 weights the
sharpness without bound. The norm is global over the perturbed parameters.

Form: the paper's main algorithm *decouples* the sharpness term from the base optimizer (the base
optimizer steps with g, then w -= lr * a * (g~ - g), like AdamW's weight decay). A variant here
returns one descent gradient to the base optimizer, so hf_sam implements the coupled form above,
which the paper also states and which equals the decoupled one for SGD without momentum; with
momentum or Adam the two differ (docs/variants.md).

Defaults: gamma 0.9 (the paper's ablation finds [0.8, 0.95] stable; 0.9 is also the peer
library's default). Cost: 2 passes; buffers g and g~ (2 gradient-sized) and the snapshot of w.
"""

from .. import ops
from .registry import Facts, register

WSAM_PAPER = {
    "title": "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a Regularization Term",
    "authors": "Yun Yue, Jiadi Jiang, Zhiling Ye, Ning Gao, Yongchao Liu, Ke Zhang",
    "venue": "KDD 2023",
    "arxiv": "2305.15817",
    "bibtex": """@inproceedings{yue2023wsam,
  title={Sharpness-Aware Minimization Revisited: Weighted Sharpness as a Regularization Term},
  author={Yue, Yun and Jiang, Jiadi and Ye, Zhiling and Gao, Ning and Liu, Yongchao and Zhang, Ke},
  booktitle={Proceedings of the 29th ACM SIGKDD Conference on Knowledge Discovery and Data Mining},
  year={2023},
  url={https://arxiv.org/abs/2305.15817}
}""",
}


def wsam(ctx):
    gamma = float(ctx.config.wsam_gamma)
    if gamma == 0:
        ctx.grad(final=True)                      # a = 0: the stock step
        return
    g = ctx.grad()                                # clean pass at w
    e = ctx.ascent(g)                             # rho * g / ||g|| (g kept)
    g_tilde = ctx.grad(at=e, release=True)        # pass at w + e
    a = gamma / (1.0 - gamma)
    ctx.set_final(ops.mix(g, g_tilde, a))         # (1 - a) g + a g~ = g + a (g~ - g)


WSAM_FACTS = Facts(
    paper='Yue et al., *Sharpness-Aware Minimization Revisited: Weighted Sharpness as a '
          'Regularization Term*, KDD 2023, [2305.15817](https://arxiv.org/abs/2305.15817)',
    settings='`rho`, `wsam_gamma` (0.9; 0.5 = SAM, 0 = stock); coupled form (docs/variants.md)',
    passes='2 (1 with gamma 0)',
    memory='2 (g kept beside g~, snapshot)',
)

register("wsam", facts=WSAM_FACTS, paper=WSAM_PAPER)(wsam)
