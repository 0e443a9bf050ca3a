"""RWP: random weight perturbation, the mixed noisy/clean gradient.

Tao Li, Weihao Yan, Zehao Lei, Yingwen Wu, Kun Fang, Ming Yang, Xiaolin Huang. "Efficient
Generalization Improvement Guided by Random Weight Perturbation", arXiv 2211.11489 (code:
nblt/RWP, train_rwp_parallel.py; follow-up arXiv 2404.00357).

    xi: filter-wise Gaussian noise. A tensor with >= 2 dims gets, in output row r,
        N(0, (gamma * ||w_r||)^2) with ||w_r|| the norm of the row (all dims but the first);
        a 1-d (or 0-d) tensor gets N(0, (gamma * (||w|| + 1e-16))^2).
    d  = alpha * grad L(w + xi) + (1 - alpha) * grad L(w)
    the base optimizer steps at w with d.

The official code computes the two gradients in parallel on two GPUs, on *different* mini-batches
(odd ranks the noisy one with loss x 2 alpha, even ranks the clean one with loss x 2 (1 - alpha); DDP
averaging forms the mix). Here both passes run sequentially on one device on the *same* micro-batch
(clean pass first, then the noisy pass), so one optimizer step sees each sample once, as the stock
step does. In multi-process runs every process does both passes on its own micro-batch and the mix
is averaged once.

Defaults: alpha = 0.5, gamma = 0.01 (CIFAR). alpha = 0 or gamma = 0 gives the stock step.
rho: RWP has no radius: its strength is the relative noise scale gamma (`rwp_gamma`) and the mix alpha.
rho = 0 gives the stock step (as for every variant); any other rho than the default 0.05 is refused
(it would be silently ignored). Noise is drawn only for the selected parameters (`perturb`), in `model.named_parameters()` order,
from a `torch.Generator` seeded from (seed, global_step, micro-step, rank); see
`hf_sam.variants.common.noise_seed`.

Cost: 2 sequential passes (the paper's speed-up needs two devices) + drawing the noise (one normal
per perturbed coordinate: on a small model at a small batch this costs about as much as a pass);
buffers: the clean gradient and the snapshot of w (the noise is freed once it is applied).
"""

import torch

from .. import ops
from .registry import Facts, register
from .common import Noise, random_perturbation, refuse_ascent_shaping

RWP_PAPER = {
    "title": "Efficient Generalization Improvement Guided by Random Weight Perturbation",
    "authors": "Tao Li, Weihao Yan, Zehao Lei, Yingwen Wu, Kun Fang, Ming Yang, Xiaolin Huang",
    "venue": "arXiv 2022",
    "arxiv": "2211.11489",
    "bibtex": """@article{li2022efficient,
  title={Efficient Generalization Improvement Guided by Random Weight Perturbation},
  author={Li, Tao and Yan, Weihao and Lei, Zehao and Wu, Yingwen and Fang, Kun and Yang, Ming and Huang, Xiaolin},
  journal={arXiv preprint arXiv:2211.11489},
  year={2022},
  url={https://arxiv.org/abs/2211.11489}
}""",
}


def filter_noise(noise: Noise, p: torch.Tensor, gamma: float) -> torch.Tensor:
    """RWP's filter-wise noise for one tensor."""
    w = p.detach()
    z = noise.normal(w)
    if w.dim() > 1:
        std = gamma * w.reshape(w.shape[0], -1).norm(dim=1)
        return z.mul_(std.reshape((-1,) + (1,) * (w.dim() - 1)).to(z.dtype))
    return z.mul_(gamma * (w.reshape(-1).norm() + 1e-16).to(z.dtype))


def rwp(ctx):
    cfg = ctx.config
    alpha, gamma = float(cfg.rwp_alpha), float(cfg.rwp_gamma)
    if cfg.rho == 0 or alpha == 0 or gamma == 0:
        ctx.grad(final=True)  # rho = 0 (every variant's off switch), or the mix is the clean gradient: the stock step
        return
    g = ctx.grad()  # clean pass at w
    noise = Noise(ctx)
    xi = random_perturbation(ctx, lambda p: filter_noise(noise, p, gamma))
    gn = ctx.grad(at=xi, release=True)  # noisy pass at w + xi (xi freed once applied)
    d = ops.mix(g, gn, alpha)  # (1 - alpha) * g + alpha * g_noisy
    ctx.set_final(d)


def _check(config):
    refuse_ascent_shaping(config, "its perturbation is random")


RWP_FACTS = Facts(
    paper="Li et al., *Efficient Generalization Improvement Guided by Random Weight Perturbation*, "
          "[2211.11489](https://arxiv.org/abs/2211.11489)",
    settings="`rwp_alpha` (0.5), `rwp_gamma` (0.01); no radius (`rho` 0 = stock step, other values refused)",
    passes="2 (sequential; the paper's 2-GPU parallel form is not used)",
    memory="2 (clean gradient, snapshot); the noise is freed once applied",
)


register("rwp", facts=RWP_FACTS, uses_rho=False, rho_note="its noise scale is rwp_gamma, its mix rwp_alpha",
         paper=RWP_PAPER, check=_check)(rwp)
