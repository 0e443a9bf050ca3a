"""MSAM: Momentum-SAM, a SAM-like step at the cost of one pass.

Paper: Marlon Becker, Frederick Altrock, Benjamin Risse. "Momentum-SAM: Sharpness Aware
Minimization without Computational Overhead", arXiv 2401.12033 (2024). Reference:
MarlonBecker/MSAM, optimizer/msam.py (SGD) and optimizer/adamW_msam.py (AdamW).

The perturbation follows the *negative* momentum of the base optimizer instead of a gradient:
    e = -rho * m / (||m|| + eps);   descend with grad L(w + e)      (one pass)
m is the optimizer's state as it stands before this step: SGD's `momentum_buffer` (v <- mu v + g)
or the Adam family's first moment `exp_avg` (not bias-corrected), read through
ctx.optimizer_state. While the optimizer has no momentum yet (first step) the pass runs at w.
The norm is global over the perturbed parameters; `adaptive` / `rho_scaling` apply to m as they
apply to g in SAM.

Differences from the official code, by design: the official optimizer keeps the weights at the
perturbed point between steps and moves them back before evaluation; here the weights are put
back right after the pass, so evaluation, checkpoints and the saved model always see w. Weight
decay stays in the base optimizer at w (the official SGD version adds wd * w at the perturbed
point). Any number of param groups is fine (the official code raises for more than one). The
loss logged is L(w + e) (there is no pass at w).

An optimizer without momentum state (SGD with momentum 0, Adagrad, Adafactor without beta1) is
refused when the trainer is built. Defaults: rho is the run's rho; the paper uses a much larger
radius than SAM (README/configs rho = 3; class defaults 0.3 for SGD, 1 for AdamW). Cost: 1 pass;
no buffer beyond the perturbation and the exact-restore copy.
"""

import inspect

import torch
from transformers import Trainer

from .common import base_optimizer
from .registry import Facts, register

MSAM_PAPER = {
    "title": "Momentum-SAM: Sharpness Aware Minimization without Computational Overhead",
    "authors": "Marlon Becker, Frederick Altrock, Benjamin Risse",
    "venue": "arXiv 2024",
    "arxiv": "2401.12033",
    "bibtex": """@article{becker2024momentumsam,
  title={Momentum-SAM: Sharpness Aware Minimization without Computational Overhead},
  author={Becker, Marlon and Altrock, Frederick and Risse, Benjamin},
  journal={arXiv preprint arXiv:2401.12033},
  year={2024},
  url={https://arxiv.org/abs/2401.12033}
}""",
}

MOMENTUM_KEYS = ("exp_avg", "momentum_buffer")
_HINT = ("Use an optimizer with momentum: optim='sgd' with optim_args='momentum=0.9', or an Adam-family "
         "optimizer such as optim='adamw_torch'.")


def _settings(trainer):
    """(optimizer class, its effective hyper-parameters) of the optimizer the Trainer will build."""
    given = getattr(trainer, "optimizer_cls_and_kwargs", None)
    if given is not None:
        cls, kwargs = given
    else:
        try:
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
        except Exception:  # noqa: BLE001 - an optimizer we cannot build here is checked at the first step
            return None, {}
    merged = {}
    try:
        for name, p in inspect.signature(cls).parameters.items():
            if p.default is not inspect.Parameter.empty:
                merged[name] = p.default
    except (TypeError, ValueError):
        pass
    merged.update(kwargs or {})
    return cls, merged


def _momentum_setting(hp):
    """(name, value) of the hyper-parameter that decides whether the optimizer keeps momentum, or None."""
    betas = hp.get("betas")
    if isinstance(betas, (tuple, list)) and betas:
        return "betas[0]", betas[0]                       # Adam family: first moment
    if "momentum" in hp:
        return "momentum", hp["momentum"]                 # SGD family: momentum buffer
    if "beta1" in hp:
        return "beta1", hp["beta1"]                       # e.g. Adafactor
    return None


def _check(cls, hp) -> None:
    """Refuse an optimizer class with hyper-parameters `hp` that keeps no momentum for MSAM to follow."""
    setting = _momentum_setting(hp)
    if setting is None:
        raise ValueError(f"variant='msam' perturbs along the base optimizer's momentum ({' or '.join(MOMENTUM_KEYS)}), "
                         f"but {cls.__name__} keeps no momentum state. {_HINT}")
    name, value = setting
    if not value:
        raise ValueError(f"variant='msam' perturbs along the base optimizer's momentum, but {cls.__name__} has "
                         f"{name}={value} and keeps none. {_HINT}")


def check_optimizer(optimizer) -> None:
    """Refuse a built optimizer (wrappers looked through) that keeps no momentum."""
    inner = base_optimizer(optimizer)
    _check(type(inner), dict(inner.defaults))


def on_setup(trainer) -> None:
    """Refuse, before training, an optimizer that keeps no momentum for MSAM to follow."""
    if trainer.optimizer is not None:
        check_optimizer(trainer.optimizer)
        return
    cls, hp = _settings(trainer)
    if cls is not None:
        _check(cls, hp)


def momentum(ctx):
    """The optimizer's momentum per parameter (None where there is none yet)."""
    for key in MOMENTUM_KEYS:
        m = ctx.optimizer_state(key)
        if any(x is not None for x in m):
            return m
    if any(ctx.optimizer.state.get(p) for p in ctx.params):
        raise RuntimeError(f"variant='msam': the optimizer's state has none of {', '.join(MOMENTUM_KEYS)}. {_HINT}")
    return m


def msam(ctx):
    m = momentum(ctx)
    if not any(x is not None and s for x, s in zip(m, ctx.selection.selected)):
        ctx.grad(final=True)                                # no momentum yet: a plain pass at w
        return
    m = [x if torch.is_tensor(x) and x.shape == p.shape else None for x, p in zip(m, ctx.params)]
    e = ctx.ascent(m, rho=-ctx.config.rho)                  # -rho * m / ||m|| (m is copied)
    ctx.grad(at=e, final=True, release=True)                # the one pass, at w - rho m / ||m||


MSAM_FACTS = Facts(
    paper="Becker, Altrock, Risse, *Momentum-SAM: Sharpness Aware Minimization without Computational Overhead*, "
          "arXiv 2401.12033",
    settings="rho (the paper uses large radii, e.g. 3)",
    passes="1",
    memory="none beyond the perturbation (reads the optimizer's momentum)",
)


register("msam", passes=1, paper=MSAM_PAPER, on_setup=on_setup, check_optimizer=check_optimizer, facts=MSAM_FACTS)(msam)
