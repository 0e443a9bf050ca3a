"""F-SAM: Friendly Sharpness-Aware Minimization.

Paper: Tao Li, Pan Zhou, Zhengbao He, Xinwen Cheng, Xiaolin Huang. "Friendly Sharpness-Aware
Minimization", CVPR 2024, arXiv 2403.12350. Reference: nblt/F-SAM, utils.py (`FriendlySAM`) and
train_gradacc.py (gradient accumulation).

The ascent removes the full-gradient component (estimated by an EMA of past clean gradients) and
keeps the batch-specific noise. With g_t the clean gradient of micro-batch t:
    t = 1:  d_1 = g_1,                 m_1 = g_1
    t > 1:  d_t = g_t - sigma * m_{t-1},  then  m_t = lambda * m_{t-1} + (1 - lambda) * g_t
    e = rho * d_t / (||d_t|| + eps);   descend with grad L(w + e)
This is the official order (d uses the previous m; m averages the *raw* clean gradients). The
paper writes d_t = g_t - sigma * m_t with m_t already containing g_t; we follow the code.

Semantics chosen (official train_gradacc.py): t counts micro-batches, so with gradient
accumulation the EMA is updated once per micro-batch; m is kept in units of the micro-batch
mean-loss gradient (the backpropagated gradient times the GA factor and divided by the fp16 loss
scale), so it does not depend on GA or on the loss scale. Under token-normalised losses
(num_items_in_batch) that unit is exact when the micro-batches hold equal numbers of tokens. A
micro-batch whose clean gradient is not finite (fp16 overflow) leaves m unchanged. m is per
device and lives in the checkpoint (sam_state.pt): a resumed run continues the same EMA.

Defaults: sigma 1, lambda 0.9 (class defaults; train.py uses lambda 0.95, run.sh 0.6 with rho
0.2). sigma = 0 is SAM. Cost: 2 passes; +1 parameter-sized buffer (m) kept between steps.
"""

import torch

from .. import ops
from .common import perturbed, pick
from .registry import Facts, register

FSAM_PAPER = {
    "title": "Friendly Sharpness-Aware Minimization",
    "authors": "Tao Li, Pan Zhou, Zhengbao He, Xinwen Cheng, Xiaolin Huang",
    "venue": "CVPR 2024",
    "arxiv": "2403.12350",
    "bibtex": """@inproceedings{li2024friendly,
  title={Friendly Sharpness-Aware Minimization},
  author={Li, Tao and Zhou, Pan and He, Zhengbao and Cheng, Xinwen and Huang, Xiaolin},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition},
  pages={5631--5640},
  year={2024},
  url={https://arxiv.org/abs/2403.12350}
}""",
}


def direction(ctx, g):
    """d_t = g_t - sigma * m_{t-1} (d_1 = g_1), and the EMA update of m; g in backpropagated units."""
    cfg, state = ctx.config, ctx.state
    m = state.setdefault("fsam_m", [None] * len(ctx.params))
    idx = perturbed(ctx, g)
    if idx:
        unit = ctx.grad_unit()                           # backpropagated -> micro-batch mean-loss gradient
        finite = torch.isfinite(ops.global_norm(pick(g, idx)))
        old = [i for i in idx if m[i] is not None]
        d = list(g)
        if old:
            g_old, m_old = pick(g, old), pick(m, old)
            d_old = torch._foreach_mul(m_old, -cfg.fsam_sigma / unit)
            torch._foreach_add_(d_old, g_old)             # d_t = g_t - sigma * m_{t-1}
            for i, x in zip(old, d_old):
                d[i] = x
            ops.zero_nonfinite_(g_old)                    # (g_old is not needed as it is any more)
            keep = torch.where(finite, cfg.fsam_lambda, 1.0)
            take = torch.where(finite, 1.0 - cfg.fsam_lambda, 0.0) * unit
            torch._foreach_mul_(m_old, keep)              # m_t = lambda * m_{t-1} + (1 - lambda) * g_t
            torch._foreach_mul_(g_old, take)
            torch._foreach_add_(m_old, g_old)
        for i in idx:
            if m[i] is None:                              # first micro-batch: d_1 = g_1, m_1 = g_1
                m[i] = torch.nan_to_num(g[i].detach(), nan=0.0, posinf=0.0, neginf=0.0).mul_(unit)
        return d
    return g


def fsam(ctx):
    e = ctx.ascent(direction(ctx, ctx.grad()), inplace=True)   # clean pass at w; rho * d / ||d||
    ctx.grad(at=e, final=True, release=True)                   # descent at w + e


FSAM_FACTS = Facts(
    paper="Li et al., *Friendly Sharpness-Aware Minimization*, CVPR 2024, arXiv 2403.12350",
    settings="`fsam_sigma` (1.0), `fsam_lambda` (0.9)",
    passes="2",
    memory="+1 persistent (EMA m, in the checkpoint)",
)


register("fsam", paper=FSAM_PAPER, facts=FSAM_FACTS)(fsam)
