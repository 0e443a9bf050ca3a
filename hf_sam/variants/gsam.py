"""GSAM: Surrogate Gap guided Sharpness-Aware Minimization.

Paper: Juntang Zhuang, Boqing Gong, Liangzhe Yuan, Yin Cui, Hartwig Adam, Nicha Dvornek, Sekhar
Tatikonda, James Duncan, Ting Liu. "Surrogate Gap Minimization Improves Sharpness-Aware Training",
ICLR 2022, arXiv 2203.08065. Reference: google-research/big_vision,
big_vision/trainers/proj/gsam/gsam.py (`gsam_gradient`, minimize_fp=True).

Per micro-batch, with g = grad L(w):
    rho_t = rho_min + (rho - rho_min) * (lr_t - lr_min) / (lr_max - lr_min)   (rho if lr_max = lr_min)
    e     = rho_t * g / (||g|| + eps)
    g_adv = grad L(w + e)
    g_par = (g . u) u,  u = g_adv / (||g_adv|| + eps);   g_perp = g - g_par
    d     = g_adv - alpha * g_perp
d descends the perturbed loss and ascends the surrogate gap's orthogonal part. The vectors are
global over the perturbed parameters; a trainable parameter that is not perturbed descends with
its own g_adv. Computed in place: d = g_adv * (1 + alpha (g . g_adv) / (||g_adv|| + eps)^2) - alpha g.

The LR tie (`gsam_rho_min`): lr_max is the schedule's peak (the param group's initial_lr, i.e.
`learning_rate`; read through ctx.optimizer), lr_min its lowest point: `min_lr` / `min_lr_rate` /
`lr_end` from SAMTrainer's `lr_scheduler_kwargs` when given, else 0 (the end of the linear, cosine
and polynomial schedules; always 0 in hf_sam.SAM, where an optimizer without an LR scheduler has no
initial_lr and keeps rho constant).
The LR of the step is the one the optimizer is about to use. During warmup rho_t is below
`gsam_rho_min` exactly as in the official code (clamped at 0). Nothing is stored: the schedule is
restored with the scheduler on resume. gsam_rho_min = None keeps rho constant.

Defaults: alpha 0.4 (PyTorch example; big_vision ViT-B/32: rho 0.6 -> rho_min 0.1, alpha 0.6).
alpha = 0 and rho_min unset is SAM. Cost: 2 passes, buffers g and g_adv (2 gradient-sized).
"""

import math

import torch

from .common import perturbed, pick, projection
from .registry import Facts, register

GSAM_PAPER = {
    "title": "Surrogate Gap Minimization Improves Sharpness-Aware Training",
    "authors": "Juntang Zhuang, Boqing Gong, Liangzhe Yuan, Yin Cui, Hartwig Adam, Nicha Dvornek, Sekhar Tatikonda, "
               "James Duncan, Ting Liu",
    "venue": "ICLR 2022",
    "arxiv": "2203.08065",
    "bibtex": """@inproceedings{zhuang2022surrogate,
  title={Surrogate Gap Minimization Improves Sharpness-Aware Training},
  author={Zhuang, Juntang and Gong, Boqing and Yuan, Liangzhe and Cui, Yin and Adam, Hartwig and Dvornek, Nicha and Tatikonda, Sekhar and Duncan, James and Liu, Ting},
  booktitle={International Conference on Learning Representations},
  year={2022},
  url={https://arxiv.org/abs/2203.08065}
}""",
}


# ---- the rho schedule ------------------------------------------------------------------------------
def lr_floor_fraction(args) -> float:
    """lr_min / lr_max of a Trainer run's schedule (0 unless lr_scheduler_kwargs says otherwise)."""
    kw = getattr(args, "lr_scheduler_kwargs", None) or {}
    if isinstance(kw, str):  # an unparsed JSON string: no floor we can read
        return 0.0
    peak = float(args.learning_rate) or 1.0
    if "min_lr" in kw:
        return float(kw["min_lr"]) / peak
    if "min_lr_rate" in kw:
        return float(kw["min_lr_rate"])
    if "lr_end" in kw:
        return float(kw["lr_end"]) / peak
    return 0.0


def scheduled_rho(ctx) -> float:
    """rho_t of GSAM: rho_min + (rho - rho_min) * (lr_t - lr_min) / (lr_max - lr_min), at least 0.

    lr_t and lr_max (`initial_lr`, set by any torch LR scheduler) come from the optimizer's first param
    group; lr_min from the Trainer's `lr_scheduler_kwargs` (0 outside the Trainer).
    """
    config = ctx.config
    rho, rho_min = config.rho, config.gsam_rho_min
    if rho_min is None or rho_min == rho:
        return rho
    args = getattr(ctx.trainer, "args", None)
    group = ctx.optimizer.param_groups[0]
    lr = float(group["lr"])
    peak = float(group.get("initial_lr", args.learning_rate if args is not None else lr))
    if peak <= 0:
        return rho
    fraction, floor = lr / peak, lr_floor_fraction(args) if args is not None else 0.0
    if not math.isfinite(fraction) or 1.0 - floor <= 0:
        return rho
    return max(0.0, rho_min + (rho - rho_min) * (fraction - floor) / (1.0 - floor))


def check(config) -> None:
    if config.gsam_rho_min is not None and config.gsam_rho_min > config.rho:
        raise ValueError(f"gsam_rho_min={config.gsam_rho_min} must not exceed rho={config.rho}: rho_t moves between "
                         "gsam_rho_min (lowest LR) and rho (peak LR).")


def gsam(ctx):
    cfg = ctx.config
    g = ctx.grad()                                         # clean pass at w
    e = ctx.ascent(g, rho=scheduled_rho(ctx))              # rho_t g / ||g||
    g_adv = ctx.grad(at=e, release=True)                   # pass at w + e (e freed once applied)
    alpha = cfg.gsam_alpha
    idx = perturbed(ctx, g, g_adv)
    if idx and alpha != 0:
        gc, ga = pick(g, idx), pick(g_adv, idx)
        c = projection(gc, ga, cfg.eps)                    # g_par = c * g_adv,  g_perp = g - g_par
        torch._foreach_mul_(ga, 1.0 + alpha * c)           # g_adv + alpha * g_par
        torch._foreach_add_(ga, gc, alpha=-alpha)          # ... - alpha * g  =  g_adv - alpha * g_perp
    ctx.set_final(g_adv)


GSAM_FACTS = Facts(
    paper="Zhuang et al., *Surrogate Gap Minimization Improves Sharpness-Aware Training*, ICLR 2022, arXiv "
          "2203.08065",
    settings="`gsam_alpha` (0.4), `gsam_rho_min` (None = constant rho)",
    passes="2",
    memory="+1 (g kept beside g_adv)",
)


register("gsam", paper=GSAM_PAPER, check=check, facts=GSAM_FACTS)(gsam)
