"""R-SAM: Random Sharpness-Aware Minimization.

Yong Liu, Siqi Mai, Minhao Cheng, Xiangning Chen, Cho-Jui Hsieh, Yang You. "Random Sharpness-Aware
Minimization", NeurIPS 2022 (OpenReview htUvh7xPoa). No official code was located.

The abstract says: smooth the loss by a random weight perturbation, then take the one-step ascent
from the smoothed (noisy) weights. THE EXACT EQUATIONS ARE UNVERIFIED (hf_sam's algorithm reference,
section 12, flags them). This module implements the documented reading:

    delta ~ N(0, sigma^2 I)                       (per coordinate, selected parameters only)
    g~    = grad L_B(w + delta)                   (first pass, at the noisy point)
    e     = delta + rho * g~ / ||g~||             (ascent from the noisy point; delta is kept)
    descend with grad L_B(w + e)                  (second pass; the base optimizer steps at w)

Open points of that reading (unverified): whether delta stays in e, whether the noise is filter-scaled,
the paper's defaults. `sigma = 0` is exactly SAM. Default `rsam_sigma` = 0.01 (unverified; note that
the noise norm grows like sigma * sqrt(#parameters)). The ascent part uses `ctx.ascent`, so
`adaptive` and `rho_scaling` apply to it as to SAM.

No pass runs at w, so the loss the Trainer reports is the descent pass's L(w + e).
Noise: a `torch.Generator` seeded from (seed, global_step, micro-step, rank); see
`hf_sam.variants.common.noise_seed`. Cost: 2 sequential passes; buffers delta, e, snapshot of w.
"""

import torch

from .registry import register
from .common import Noise, random_perturbation

RSAM_PAPER = {
    "title": "Random Sharpness-Aware Minimization",
    "authors": "Yong Liu, Siqi Mai, Minhao Cheng, Xiangning Chen, Cho-Jui Hsieh, Yang You",
    "venue": "NeurIPS 2022",
    "arxiv": None,
    "bibtex": """@inproceedings{liu2022random,
  title={Random Sharpness-Aware Minimization},
  author={Liu, Yong and Mai, Siqi and Cheng, Minhao and Chen, Xiangning and Hsieh, Cho-Jui and You, Yang},
  booktitle={Advances in Neural Information Processing Systems},
  year={2022},
  url={https://openreview.net/forum?id=htUvh7xPoa}
}""",
}


def rsam(ctx):
    sigma = float(ctx.config.rsam_sigma)
    if sigma == 0:
        delta = None
    else:
        noise = Noise(ctx)
        delta = random_perturbation(ctx, lambda p: noise.normal(p).mul_(sigma))
    g = ctx.grad(at=delta)                      # pass at the noisy point w + delta
    e = ctx.ascent(g, inplace=True)             # rho * g~ / ||g~||
    if delta is not None:
        pairs = [(x, y) for x, y in zip(e, delta) if x is not None and y is not None]
        if pairs:
            torch._foreach_add_([x for x, _ in pairs], [y for _, y in pairs])
        e = [y if x is None else x for x, y in zip(e, delta)]
    del g, delta
    ctx.grad(at=e, final=True, release=True)    # descent at w + delta + rho g~/||g~||


register("rsam", paper=RSAM_PAPER)(rsam)
