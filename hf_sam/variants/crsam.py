"""CR-SAM: Curvature-Regularized Sharpness-Aware Minimization.

Paper: Tao Wu, Tie Luo, Donald C. Wunsch II. "CR-SAM: Curvature Regularized Sharpness-Aware
Minimization", AAAI 2024, 38(6):6144-6152, arXiv 2312.13555. Reference: TrustAIoT/CR-SAM,
utils/crsam.py (`first_step`, `second_step`, `third_step`).

Three passes on the same micro-batch:
    g0 = grad L(w);   e = rho * g0 / (||g0|| + eps)
    g+ = grad L(w + e);   g- = grad L(w - e)
    d  = g+ + gamma * (g+ + g- - 2 g0) + beta * (g+ - g-)
The gamma term is the central second difference along e (a Hessian-trace-like curvature
penalty), the beta term ~ 2 rho H g0 / ||g0||; how gamma and beta map to the paper's
coefficients is unverified. d is applied to every trainable parameter (as in the code: all
three gradients exist for every parameter, perturbed or not). BatchNorm statistics keep the
clean pass's values (the official script also updates them at w - e).

Defaults: gamma 0.1, beta 0.1 (class defaults; crsam_train.py uses beta 0.01, rho 0.1).
gamma = beta = 0 is SAM. Cost: 3 sequential passes; 3 gradient-sized buffers (g0, g+, g-),
d computed in place in g+.
"""

import torch

from .registry import Facts, register

CRSAM_PAPER = {
    "title": "CR-SAM: Curvature Regularized Sharpness-Aware Minimization",
    "authors": "Tao Wu, Tie Luo, Donald C. Wunsch II",
    "venue": "AAAI 2024",
    "arxiv": "2312.13555",
    "bibtex": """@inproceedings{wu2024crsam,
  title={CR-SAM: Curvature Regularized Sharpness-Aware Minimization},
  author={Wu, Tao and Luo, Tie and Wunsch II, Donald C.},
  booktitle={Proceedings of the AAAI Conference on Artificial Intelligence},
  volume={38},
  number={6},
  pages={6144--6152},
  year={2024},
  url={https://arxiv.org/abs/2312.13555}
}""",
}


def crsam(ctx):
    gamma, beta = ctx.config.crsam_gamma, ctx.config.crsam_beta
    g0 = ctx.grad()                                   # clean pass at w
    e = ctx.ascent(g0)                                # rho * g0 / ||g0|| (g0 kept)
    g_plus = ctx.grad(at=e)                           # pass at w + e
    torch._foreach_neg_([x for x in e if x is not None])
    g_minus = ctx.grad(at=e, release=True)            # pass at w - e (e freed once applied)
    idx = [i for i, (a, b, c) in enumerate(zip(g0, g_plus, g_minus))
           if a is not None and b is not None and c is not None]
    if idx and (gamma or beta):
        gp = [g_plus[i] for i in idx]
        torch._foreach_mul_(gp, 1.0 + gamma + beta)                         # (1 + gamma + beta) g+
        torch._foreach_add_(gp, [g_minus[i] for i in idx], alpha=gamma - beta)  # + (gamma - beta) g-
        torch._foreach_add_(gp, [g0[i] for i in idx], alpha=-2.0 * gamma)   # - 2 gamma g0
    ctx.set_final(g_plus)                             # d = g+ + gamma (g+ + g- - 2 g0) + beta (g+ - g-)


CRSAM_FACTS = Facts(
    paper="Wu, Luo, Wunsch, *CR-SAM: Curvature Regularized Sharpness-Aware Minimization*, AAAI 2024, arXiv "
          "2312.13555",
    settings="`crsam_gamma` (0.1), `crsam_beta` (0.1)",
    passes="3",
    memory="+2 (g0, g+, g- held together; d built in place in g+)",
)


register("crsam", passes=3, paper=CRSAM_PAPER, facts=CRSAM_FACTS)(crsam)
