"""bSAM: Bayesian SAM, SAM as an optimal relaxation of Bayes.

Paper: Thomas Möllenhoff, Mohammad Emtiyaz Khan. "SAM as an Optimal Relaxation of Bayes",
ICLR 2023, arXiv 2210.01620. Reference: team-approx-bayes/bayesian-sam, optim.py
(`build_bsam_optimizer`) and train.py.

bSAM learns a Gaussian posterior N(w, 1 / (N s)) with mean w and per-parameter precision s. One
step, with the window's micro-batches b (m-sharpness: each micro-batch gets its own noise and
perturbation, as the official `batchsplit`), N the number of training examples, delta the L2
regulariser (prior precision / N) and gamma the damping:
    xi_b   ~ N(0, 1 / (N s))                    noise, elementwise
    g_b    = grad L_b(w + xi_b)                 gradient at the noisy sample
    e_b    = rho * g_b / s                      the ascent: not normalised, scaled by 1 / s
    ge_b   = grad L_b(w + e_b)
    g_m    <- beta1 g_m + (1 - beta1) (mean_b ge_b + delta w)
    w      <- w - lr * g_m / s                  (with the s before its update)
    s      <- beta2 s + (1 - beta2) (mean_b sqrt(s) |g_b| + gamma + delta)
The mean update is bSAM's own (Adam-like, preconditioned by s, not sqrt(v)). A variant hands one
gradient to the base optimizer, so bsam hands it d = g_m / s and needs plain SGD (momentum 0,
weight decay 0; delta is bsam's): SGD's step w - lr * d is then exactly bSAM's, and lr (with the
Trainer's schedule) is bSAM's alpha. Other optimizers are refused before training. g_m and s are
per device, live in the variant state (saved with checkpoints: a resumed run equals an
uninterrupted one) and are kept in units of the mean loss (the backpropagated gradient times the
GA factor, divided by the fp16 loss scale). Noise is drawn for the perturbed parameters from the
seeded generator of hf_sam.variants.common (seed, step, micro-step, rank); g_m and s cover every
trainable parameter. hf_sam.SAM runs bsam with one micro-batch per optimizer step (the closure front-end
does not know the length of an accumulation window, which the unnormalised ascent needs; a second
micro-batch is refused before it moves any weight).

Defaults (the official README's CIFAR-10/100 ResNet-18 command): rho 0.01, beta1 0.9,
beta2 0.999, prior precision 10, damping 0.1, s_init 1, lr (the SGD LR) 0.5; N = the training-set
size (times the README's `dafactor` 4 for its data augmentation: pass bsam_num_data). rho = 0
turns bsam off (the stock step with the base optimizer). Cost: 2 passes; kept: g_m and s (2
parameter-sized), plus 2 accumulators during an accumulation window; transient: noise, g, e, ge.
"""

import torch

from .. import ops
from .common import Noise, base_optimizer, micro_step, random_perturbation
from .msam import _settings
from .registry import Facts, register

BSAM_PAPER = {
    "title": "SAM as an Optimal Relaxation of Bayes",
    "authors": "Thomas Möllenhoff, Mohammad Emtiyaz Khan",
    "venue": "ICLR 2023",
    "arxiv": "2210.01620",
    "bibtex": """@inproceedings{mollenhoff2023sam,
  title={{SAM} as an Optimal Relaxation of {Bayes}},
  author={M{\\"o}llenhoff, Thomas and Khan, Mohammad Emtiyaz},
  booktitle={International Conference on Learning Representations},
  year={2023},
  url={https://arxiv.org/abs/2210.01620}
}""",
}

_HINT = ("bSAM's update w <- w - lr * g_m / s is its own (Adam-like); bsam hands g_m / s to the base optimizer, "
         "which must be plain SGD: optim='sgd' with momentum 0 and weight_decay 0 (bSAM's L2 term is "
         "bsam_prior_precision).")


def _check(cls, hp) -> None:
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.SGD)):
        raise ValueError(f"variant='bsam' needs torch.optim.SGD as the base optimizer, got {cls.__name__}. {_HINT}")
    for name in ("momentum", "weight_decay"):
        if hp.get(name, 0):
            raise ValueError(f"variant='bsam' needs SGD with {name}=0, got {name}={hp[name]}. {_HINT}")


def check_optimizer(optimizer) -> None:
    inner = base_optimizer(optimizer)
    _check(type(inner), {k: max((g.get(k, 0) for g in inner.param_groups), default=0)
                         for k in ("momentum", "weight_decay")})


def on_setup(trainer) -> None:
    """Refuse, before training, a base optimizer other than plain SGD, and a run without N."""
    if trainer.optimizer is not None:
        check_optimizer(trainer.optimizer)
    else:
        cls, hp = _settings(trainer)
        if cls is not None:
            _check(cls, hp)
    if trainer.sam_config.bsam_num_data is None and not hasattr(trainer.train_dataset, "__len__"):
        raise ValueError("variant='bsam' needs N, the number of training examples: set bsam_num_data "
                         "(the training dataset has no len()).")


def num_data(ctx) -> int:
    n = ctx.config.bsam_num_data
    if n is None:
        dataset = getattr(ctx.trainer, "train_dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            raise ValueError("variant='bsam' needs N, the number of training examples: set bsam_num_data.")
        n = len(dataset)
    return int(n)


def bsam(ctx):
    cfg, state = ctx.config, ctx.state
    n_params = len(ctx.params)
    s = state.setdefault("bsam_s", [None] * n_params)
    gm = state.setdefault("bsam_gm", [None] * n_params)
    delta = cfg.bsam_prior_precision / num_data(ctx)
    micro, window = micro_step(ctx), ctx.accumulation_steps
    if micro >= window:  # hf_sam.SAM does not know the window's length, which e = rho g / s needs
        raise ValueError("variant='bsam' in hf_sam.SAM takes one micro-batch per step (one accumulate or step(closure) "
                         "per optimizer step); use SAMTrainer for gradient accumulation.")
    last = micro == window - 1
    for i, p in enumerate(ctx.params):
        if s[i] is None:
            s[i] = torch.full_like(p, cfg.bsam_s_init, dtype=torch.float32)
            gm[i] = torch.zeros_like(p, dtype=torch.float32)
    if micro == 0:
        state["bsam_gs"] = [torch.zeros_like(x) for x in s]    # mean_b sqrt(s) |g_b|
        state["bsam_ge"] = [torch.zeros_like(x) for x in s]    # mean_b ge_b
    if last:                                                   # g_m <- beta1 g_m + (1 - beta1) delta w (at w)
        with torch.no_grad():
            torch._foreach_mul_(gm, cfg.bsam_beta1)
            torch._foreach_add_(gm, [p.detach().float() for p in ctx.params], alpha=(1 - cfg.bsam_beta1) * delta)
    noise = Noise(ctx)
    scale = {id(p): x.mul(num_data(ctx)).reciprocal_().sqrt_() for p, x in zip(ctx.params, s)}  # 1 / sqrt(N s)
    xi = random_perturbation(ctx, lambda p: noise.normal(p).mul_(scale[id(p)].to(p.dtype)))
    del scale
    g = ctx.grad(at=xi, release=True)                          # pass at the noisy sample w + xi
    unit = ctx.grad_unit()                                     # -> micro-batch mean-loss gradient
    e = [None] * n_params
    with torch.no_grad():
        for i, (x, keep) in enumerate(zip(g, ctx.selection.selected)):
            if x is None:
                continue
            gi = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0).mul_(unit)  # no overflow in s
            if keep:
                e[i] = (gi * cfg.rho / s[i]).to(x.dtype)       # e = rho * g / s
            state["bsam_gs"][i].add_(s[i].sqrt() * gi.abs_(), alpha=1.0 / window)
    del g
    ge = ctx.grad(at=e, release=True)                          # pass at w + e
    with torch.no_grad():
        for i, x in enumerate(ge):
            if x is not None:
                gi = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0).mul_(unit)
                state["bsam_ge"][i].add_(gi, alpha=1.0 / window)
    del ge
    if not last:
        ctx.set_final([None] * n_params)                       # the step's gradient comes on the last micro-batch
        return
    with torch.no_grad():
        torch._foreach_add_(gm, state["bsam_ge"], alpha=1 - cfg.bsam_beta1)
        d = torch._foreach_div(gm, s)                          # g_m / s, with the s before its update
        torch._foreach_mul_(s, cfg.bsam_beta2)
        torch._foreach_add_(state["bsam_gs"], cfg.bsam_damping + delta)
        torch._foreach_add_(s, state["bsam_gs"], alpha=1 - cfg.bsam_beta2)
        back = ctx.inverse_loss_scale()                        # .grad is in the fp16 scaler's units
        d = [(x / back).to(p.dtype) for x, p in zip(d, ctx.params)]
    state.pop("bsam_gs")
    state.pop("bsam_ge")
    ctx.set_final(d)


def _check_settings(config):
    if config.adaptive or config.rho_scaling != "none":
        raise ValueError("variant='bsam' scales its ascent by 1 / s (e = rho g / s); adaptive and rho_scaling do not "
                         "apply: remove adaptive=True and use rho_scaling='none'.")


BSAM_FACTS = Facts(
    paper='Möllenhoff, Khan, *SAM as an Optimal Relaxation of Bayes*, ICLR 2023, '
          '[2210.01620](https://arxiv.org/abs/2210.01620)',
    settings='`rho` (paper 0.01), `bsam_num_data` (len(train_dataset)), `bsam_prior_precision` (10), '
             '`bsam_beta1` (0.9), `bsam_beta2` (0.999), `bsam_damping` (0.1), `bsam_s_init` (1); base'
             " optimizer plain SGD (LR = bSAM's alpha, 0.5 in the paper)",
    passes='2 (noisy sample, perturbed mean)',
    memory='2 persistent (s, g_m; in the checkpoint) + 2 accumulators during a GA window; transient '
           'noise, g, e, snapshot',
)

register("bsam", facts=BSAM_FACTS, paper=BSAM_PAPER, check=_check_settings, on_setup=on_setup,
         check_optimizer=check_optimizer)(bsam)
