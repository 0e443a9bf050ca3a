"""MESA: Memory-Efficient Sharpness-Aware training (SAF with an EMA teacher; no weight perturbation).

Jiawei Du, Daquan Zhou, Jiashi Feng, Vincent Y. F. Tan, Joey Tianyi Zhou. "Sharpness-Aware Training
for Free", NeurIPS 2022, arXiv 2205.14083 (code: AngusDujw/SAF, MESA_train.py).

One pass per micro-batch with the loss

    L = CE(z, y) + lambda * T^2 * mean_b KL( softmax(z_ema,b / T) || softmax(z_b / T) )

z = the current logits (train mode); z_ema = the logits of the exponential moving average of the
weights on the same inputs (no grad, eval mode, as timm's ModelEmaV2 module). The EMA is updated
after every optimizer step, from the first one: ema <- decay * ema + (1 - decay) * w, over the
trainable parameters and the floating-point buffers (BatchNorm statistics); it starts from the
weights before the first step. The KL term is active in epochs e > saf_start (0-based, strict, as the
code's `epoch > kl_start_epoch`); before that the EMA forward is skipped (it would not change
anything). `rho` is not used: rho = 0 gives the stock step (no KL term, no EMA forward; the EMA is
still kept), any other rho than the default is refused; the strength is `saf_lambda`.

Defaults (official MESA_train.py): lambda = 0.3 (`saf_lambda`; run.sh: 0.8), T = 5 (`saf_temperature`),
E_start = 5 (`saf_start`), decay = 0.9998 (`mesa_decay`).

The EMA forward uses `torch.func.functional_call` on the unwrapped model, so no weights are swapped.
The EMA (fp32 for fp16/bf16 tensors) is saved in sam_state.pt. Supports classification logits
[batch, classes]. The gates `interval`, `start`, `end` do not apply (refused).

Cost: 1 pass + 1 no-grad forward; +1 parameter copy (the EMA).
"""

import torch
from transformers import TrainerCallback

from .registry import Facts, register
from .saf import SAF_PAPER, check_trajectory_config, classification_logits, current_epoch, kl_term

EMA = "mesa_ema"


def ema_targets(trainer) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs the EMA follows: trainable parameters, then floating buffers in the state dict."""
    model = trainer.model
    out = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    persistent = set(model.state_dict(keep_vars=True).keys())
    out += [(n, b) for n, b in model.named_buffers() if b.is_floating_point() and n in persistent]
    return out


def _as_ema(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def init_ema(trainer) -> None:
    st = trainer.sam_state
    if EMA not in st:
        st[EMA] = [_as_ema(t).clone() for _, t in ema_targets(trainer)]


def update_ema(trainer) -> None:
    st = trainer.sam_state
    if EMA not in st:
        return
    decay = float(trainer.sam_config.mesa_decay)
    with torch.no_grad():
        ema = st[EMA]
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, [_as_ema(t) for _, t in ema_targets(trainer)], alpha=1.0 - decay)


class MESACallback(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        update_ema(self.trainer)


def ema_logits(trainer, inputs) -> torch.Tensor:
    model = trainer.model
    targets = ema_targets(trainer)
    ema = trainer.sam_state[EMA]
    values = {n: e.to(t.dtype) for (n, t), e in zip(targets, ema)}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = torch.func.functional_call(model, values, args=(), kwargs=dict(inputs))
    finally:
        model.train(was_training)
    return classification_logits(outputs, "mesa").detach()


def mesa(ctx):
    trainer, cfg = ctx.trainer, ctx.config
    init_ema(trainer)
    lam = float(cfg.saf_lambda)
    active = current_epoch(ctx) > cfg.saf_start and lam != 0 and cfg.rho != 0  # rho = 0: the stock step

    def hook(compute, model, inputs, num_items_in_batch):
        ref = ema_logits(trainer, inputs) if active else None
        loss, outputs = compute(inputs)
        if active:
            logits = classification_logits(outputs, "mesa")
            loss = loss + lam * kl_term(trainer, logits, ref, cfg.saf_temperature, num_items_in_batch)
        return loss, outputs

    ctx.grad(final=True, loss_hook=hook)


def on_setup(trainer):
    trainer.add_callback(MESACallback(trainer))


MESA_FACTS = Facts(
    paper="same",
    settings="`saf_lambda` (0.3), `saf_temperature` (5), `saf_start` (5 epochs), `mesa_decay` (0.9998); "
             "no radius (`rho` 0 = stock step, other values refused)",
    passes="1 + 1 no-grad forward",
    memory="1 (EMA weights)",
)


register("mesa", passes=1, uses_rho=False, rho_note="its strength is saf_lambda", paper=SAF_PAPER,
         check=check_trajectory_config("mesa"),
         on_setup=on_setup, facts=MESA_FACTS)(mesa)
