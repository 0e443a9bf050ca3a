"""SAMPa: SAM parallelized, computed sequentially on one device.

Wanyun Xie, Thomas Pethick, Volkan Cevher. "SAMPa: Sharpness-aware Minimization Parallelized",
NeurIPS 2024, arXiv 2410.10683 (code: LIONS-EPFL/SAMPa, train.py).

The auxiliary sequence y replaces the clean gradient of SAM's ascent by the gradient at y_t, which
the previous step already computed, so the two gradients of a step are independent:

    x~_t    = x_t + rho * grad f(y_t) / (||grad f(y_t)|| + eps)
    y_{t+1} = x_t - eta_t * grad f(y_t)
    x_{t+1} = x_t - eta_t * [ (1 - lambda) grad f(x~_t) + lambda grad f(y_{t+1}) ]

The official code runs the two passes on two GPUs; this module runs them one after the other and
reproduces its numbers exactly (single process, batch = one optimizer step's window):
- grad f(x~_t) is taken on the *previous* step's batch (the batch grad f(y_t) came from), and
  grad f(y_{t+1}) on the current batch; the step's descent direction is their (1 - lambda, lambda) mix;
- the extrapolation y_{t+1} = x_t - lr * (grad f(y_t) + momentum * buf + weight_decay * x_t) uses the
  SGD momentum buffer and weight decay of the base optimizer when it is torch SGD with a momentum
  buffer, as the official code; for any other optimizer it is the plain step x_t - lr * grad f(y_t);
  lr, momentum and weight decay are the parameter's group values of this step;
- on the first step (no grad f(y) yet) y_1 = x_0 and x~_0 = x_0: both gradients are the clean one,
  so the first step is the stock step and costs one pass.

With gradient accumulation the window is the batch: grad f(y_t) is the window's accumulated gradient
(saved unscaled), one perturbation serves every micro-batch of the window, and micro-batch j of this
window re-uses micro-batch j of the previous one for grad f(x~_t) (so the step equals the official
code run with batch = window). State: grad f(y) (1 parameter copy), the previous window's prepared
inputs, the step they belong to; saved with checkpoints. When the previous optimizer step was not a
SAMPa step (a gate `interval`/`start`/`end`, or a fresh run) the sequence restarts as on the first
step. In multi-process runs each process keeps its own y-gradient (per-device ascent).

Default lambda = 0.2 ("SAMPa-0.2"; official rho = 0.1 with SGD lr 0.1, momentum 0.9, wd 5e-4).
lambda = 0 works here (the official code recovers grad f(y) as (agg - pert)/lambda and cannot).
`rho = 0` gives the stock step. Only selected parameters are moved (`perturb`).

Cost: 2 sequential passes per micro-batch (one on the first step); +2 parameter copies (grad f(y),
the next one while a window accumulates) + one window of inputs.
"""

import torch

from .. import ops
from .common import base_optimizer, micro_step
from .registry import Facts, register

SAMPA_PAPER = {
    "title": "SAMPa: Sharpness-aware Minimization Parallelized",
    "authors": "Wanyun Xie, Thomas Pethick, Volkan Cevher",
    "venue": "NeurIPS 2024",
    "arxiv": "2410.10683",
    "bibtex": """@inproceedings{xie2024sampa,
  title={{SAMPa}: Sharpness-aware Minimization Parallelized},
  author={Xie, Wanyun and Pethick, Thomas and Cevher, Volkan},
  booktitle={Advances in Neural Information Processing Systems},
  year={2024},
  url={https://arxiv.org/abs/2410.10683}
}""",
}

Y_GRAD, INPUTS, STEP = "sampa_y_grad", "sampa_inputs", "sampa_step"
NEXT_Y, NEXT_INPUTS = "sampa_next_y_grad", "sampa_next_inputs"


def _capture(box, replay=None):
    """loss_hook: run the pass on `replay` (the previous batch) if given; store the inputs it ran on."""

    def hook(compute, model, inputs, num_items_in_batch):
        batch = replay if replay is not None else inputs
        box.append(dict(batch))
        return compute(dict(batch))

    return hook


def _extrapolation(ctx, y_grad):
    """-(lr * (grad f(y) + momentum * buf + wd * x)) per selected parameter (the official y step)."""
    opt = ctx.optimizer
    sgd = isinstance(base_optimizer(opt), torch.optim.SGD)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    out = [None] * len(ctx.params)
    with torch.no_grad():
        for i, (p, yg) in enumerate(zip(ctx.params, y_grad)):
            if yg is None or not ctx.selection.selected[i]:
                continue
            group = group_of[id(p)]
            d = yg.to(p.dtype).clone()
            buf = opt.state.get(p, {}).get("momentum_buffer") if sgd else None
            if buf is not None:
                extra = p.detach() * group["weight_decay"]
                extra += buf * group["momentum"]
                d += extra
            out[i] = d.mul_(-group["lr"])
    return out


def _open_window(ctx, micro) -> None:
    """First micro-batch of a step: restart the sequence if the previous step was not a SAMPa step, and
    open the accumulators of grad f(y_{t+1}) and of the window's inputs."""
    st = ctx.state
    if micro == 0:
        if st.get(STEP) != ctx.global_step - 1:  # fresh run, or the previous step was not a SAMPa step
            for key in (Y_GRAD, INPUTS, STEP):
                st.pop(key, None)
        st[NEXT_Y], st[NEXT_INPUTS] = None, []


def _carry(ctx, g_y, inputs, last) -> None:
    """Add grad f(y_{t+1}) of this micro-batch to the window's sum (unscaled: fp16 loss scale removed);
    at the window's end the sum becomes grad f(y) of the next step, with the inputs it came from."""
    st = ctx.state
    inv = ctx.inverse_loss_scale()
    acc = st.get(NEXT_Y)
    if acc is None:
        acc = [None if g is None else (g * inv).detach() for g in g_y]
    else:
        acc = [a if g is None else ((g * inv) if a is None else a.add_(g * inv)) for a, g in zip(acc, g_y)]
    st[NEXT_Y] = acc
    st[NEXT_INPUTS].append(inputs)
    if last:
        st[Y_GRAD], st[INPUTS], st[STEP] = st.pop(NEXT_Y), st.pop(NEXT_INPUTS), ctx.global_step


def first_step(ctx, seen):
    """y_1 = x_0 and x~_0 = x_0: both gradients are the clean one (the stock step, one pass)."""
    g_y = ctx.grad(loss_hook=_capture(seen))
    ctx.set_final(g_y)
    return g_y


def sampa_step(ctx, y_grad, replay, seen):
    """The SAMPa step from grad f(y_t); returns grad f(y_{t+1})."""
    lam = float(ctx.config.sampa_lambda)
    unit = ctx.grad_unit()  # grad f(y_t) is stored unscaled; the ascent reads backprop units (logged norm)
    e = ctx.ascent([None if y is None else y / unit for y in y_grad], inplace=True)  # rho grad f(y_t) / ||.||
    g_pert = ctx.grad(at=e, loss_hook=_capture([], replay))                 # grad f(x~_t), previous batch
    g_y = ctx.grad(at=_extrapolation(ctx, y_grad), loss_hook=_capture(seen))  # grad f(y_{t+1}), this batch
    ctx.set_final(ops.mix(g_pert, g_y, lam))  # (1 - lambda) grad f(x~_t) + lambda grad f(y_{t+1})
    return g_y


def sampa(ctx):
    micro = micro_step(ctx)
    _open_window(ctx, micro)
    y_grad, previous, seen = ctx.state.get(Y_GRAD), ctx.state.get(INPUTS) or [], []
    if y_grad is None:
        g_y = first_step(ctx, seen)
    else:
        g_y = sampa_step(ctx, y_grad, previous[micro] if micro < len(previous) else None, seen)
    _carry(ctx, g_y, seen[-1], last=micro == ctx.accumulation_steps - 1)


SAMPA_FACTS = Facts(
    paper="Xie, Pethick, Cevher, *SAMPa: Sharpness-aware Minimization Parallelized*, NeurIPS 2024, "
          "[2410.10683](https://arxiv.org/abs/2410.10683)",
    settings="`rho`, `sampa_lambda` (0.2)",
    passes="2 (sequential; 1 on the first step)",
    memory="3 (∇f(y), the next one, snapshot) + one window of inputs",
)


# The passes replay the previous window's inputs through a loss hook, which only the Trainer runs.
register("sampa", trainer_only=True, paper=SAMPA_PAPER, facts=SAMPA_FACTS)(sampa)
