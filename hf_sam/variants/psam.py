"""Preconditioned SAM for Adam-family base optimizers.

Sidak Pal Singh, Hossein Mobahi, Atish Agarwala, Yann Dauphin. "Avoiding spurious sharpness
minimization broadens applicability of SAM", ICML 2025, arXiv 2502.02407.

The ascent is preconditioned with the base optimizer's own second-moment estimate:

    v_hat = exp_avg_sq / (1 - beta2^t)          (Adam's bias-corrected v, t = steps taken so far;
                                                  max_exp_avg_sq with amsgrad)
    u     = g / (sqrt(v_hat) + eps_adam)         (eps_adam = the optimizer group's eps)
    e     = rho * u / ||u||                      (ctx.ascent: global fp32 norm, selected params)
    descend with grad L_B(w + e)

This is the form in hf_sam's algorithm reference (section 21), where its details are flagged
unverified (no official PyTorch code located). Until the optimizer has state for every perturbed
parameter (the first step) the ascent is SAM's (raw g). v_hat is the state *before* this step's
update, i.e. the preconditioner the optimizer would apply to the previous gradient.

Needs torch Adam / AdamW (`optim="adamw_torch"`, `"adamw_torch_fused"`, or an Adam/AdamW instance
passed to the Trainer); any other optimizer is refused at set-up. Defaults: rho as SAM (0.05); the
paper tunes rho per model size. Cost: 2 passes, +1 buffer (u).
"""

import math

import torch

from .common import base_optimizer
from .registry import Facts, register

PSAM_PAPER = {
    "title": "Avoiding spurious sharpness minimization broadens applicability of SAM",
    "authors": "Sidak Pal Singh, Hossein Mobahi, Atish Agarwala, Yann Dauphin",
    "venue": "ICML 2025",
    "arxiv": "2502.02407",
    "bibtex": """@inproceedings{singh2025avoiding,
  title={Avoiding spurious sharpness minimization broadens applicability of {SAM}},
  author={Singh, Sidak Pal and Mobahi, Hossein and Agarwala, Atish and Dauphin, Yann},
  booktitle={Proceedings of the 42nd International Conference on Machine Learning},
  pages={55702--55719},
  year={2025},
  url={https://arxiv.org/abs/2502.02407}
}""",
}

ADAM_OPTIM_NAMES = ("adamw_torch", "adamw_torch_fused")


def check_optimizer(optimizer) -> None:
    """Refuse a built optimizer that is not torch Adam/AdamW (wrappers such as accelerate's are looked through)."""
    if not isinstance(base_optimizer(optimizer), (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(f"variant='psam' preconditions the ascent with Adam's second moment, but the optimizer is "
                         f"{type(optimizer).__name__}. Use torch.optim.Adam/AdamW (optim='adamw_torch').")


def on_setup(trainer):
    if trainer.optimizer is not None:
        check_optimizer(trainer.optimizer)
        return
    cls_kwargs = getattr(trainer, "optimizer_cls_and_kwargs", None)
    if cls_kwargs is not None:
        if not (isinstance(cls_kwargs[0], type) and issubclass(cls_kwargs[0], (torch.optim.Adam, torch.optim.AdamW))):
            raise ValueError(f"variant='psam' needs torch.optim.Adam or AdamW, got optimizer_cls_and_kwargs with "
                             f"{getattr(cls_kwargs[0], '__name__', cls_kwargs[0])}.")
        return
    optim = str(getattr(trainer.args.optim, "value", trainer.args.optim))
    if optim not in ADAM_OPTIM_NAMES:
        raise ValueError(f"variant='psam' preconditions the ascent with Adam's second moment; optim={optim!r} is not "
                         f"supported. Use one of: {', '.join(ADAM_OPTIM_NAMES)}.")


def precondition(ctx, g):
    """u = g / (sqrt(v_hat) + eps) for the selected parameters with a gradient; None if some lack state."""
    opt = ctx.optimizer
    state = opt.state
    group_of = {}
    for group in opt.param_groups:
        if "betas" not in group or "eps" not in group:
            raise ValueError("variant='psam' needs an Adam-family optimizer (param groups with 'betas' and 'eps').")
        for p in group["params"]:
            group_of[id(p)] = group
    idx = [i for i, x in enumerate(g) if x is not None and ctx.selection.selected[i]]
    denoms, scales = [], []
    for i in idx:
        p = ctx.params[i]
        st = state.get(p, {})
        group = group_of[id(p)]
        v = st.get("max_exp_avg_sq") if group.get("amsgrad", False) else st.get("exp_avg_sq")
        step = st.get("step")
        if v is None or step is None or float(step) < 1:
            return None
        denoms.append(v)
        scales.append((math.sqrt(1.0 - group["betas"][1] ** float(step)), group["eps"]))
    if not idx:
        return None
    den = torch._foreach_sqrt(denoms)
    torch._foreach_div_(den, [s for s, _ in scales])
    torch._foreach_add_(den, [e for _, e in scales])
    u = torch._foreach_div([g[i] for i in idx], [d.to(g[i].dtype) for d, i in zip(den, idx)])
    out = [None] * len(g)
    for i, x in zip(idx, u):
        out[i] = x
    return out


def psam(ctx):
    g = ctx.grad()                              # clean pass at w
    u = precondition(ctx, g)
    e = ctx.ascent(g if u is None else u, inplace=True)
    del g, u
    ctx.grad(at=e, final=True, release=True)    # descent at w + rho u / ||u||


PSAM_FACTS = Facts(
    paper="Singh, Mobahi, Agarwala, Dauphin, *Avoiding spurious sharpness minimization broadens applicability of "
          "SAM*, ICML 2025, [2502.02407](https://arxiv.org/abs/2502.02407)",
    settings="`rho`; Adam/AdamW only",
    passes="2",
    memory="2 (u, snapshot)",
)


register("psam", paper=PSAM_PAPER, on_setup=on_setup, check_optimizer=check_optimizer, facts=PSAM_FACTS)(psam)
