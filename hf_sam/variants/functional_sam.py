"""Functional-SAM: descend along the network Jacobian at w + e, contracted with the output gradient at w.

Sidak Pal Singh, Hossein Mobahi, Atish Agarwala, Yann Dauphin. "Avoiding spurious sharpness
minimization broadens applicability of SAM", ICML 2025, arXiv 2502.02407 (the same paper as `psam`).

SAM's descent gradient grad_w L(f(w + e)) = J(w + e)^T dL/df(f(w + e)) changes both factors; the
paper argues that in language modelling the change of the second one (the "logit path": the loss
gradient with respect to the outputs) dominates and regularises logit statistics rather than the
geometry of the function. Functional-SAM keeps the output gradient of the unperturbed point:

    clean pass at w:     z = f(w),  g = grad_w L(z),  dz = dL/dz at w (detached)
    ascent:              e = rho * a / ||a||,  a = g ("raw", SAM's ascent) or, with
                         functional_sam_ascent="adam", a = g / (sqrt(v_hat) + eps_adam) as in `psam`
    descent pass at w+e: g_F = J(w + e)^T dz = grad_w <f(w + e), dz>

In PyTorch: the clean pass's loss hook takes dz = autograd.grad(loss, logits) (an extra backward
from the loss to the logits only); the descent pass backpropagates sum(logits(w + e) * dz) instead of
the loss at w + e (its reported value is still L(w + e), so the sharpness metric keeps its meaning).
Both passes go through the step context, so gradient accumulation and num_items scaling, fp16 loss
scaling, DDP no_sync on the clean pass, dropout replay and the exact restore of w are the engine's.
Stateless (with ascent="adam" it reads the optimizer's state, which the Trainer checkpoints). Needs
SAMTrainer (the Trainer front-end's loss hooks); hf_sam.SAM refuses it.

Limits: g_F = grad L(w) when f is linear in w (J does not depend on w); g_F = SAM's gradient when the
loss is linear in the outputs (dz does not depend on w). The model must return logits
(`outputs["logits"]` or `outputs[1]`); any shape works (classification or [batch, seq, vocab]), and
dz (one logits-sized tensor) is held between the passes.

Unverified (no official code located; the paper's JAX/Nanodo setup): which e the paper uses per
configuration (raw SAM ascent or the Adam-preconditioned one; its headline runs are "preconditioned
Functional-SAM") and the exact normalisation of the preconditioned ascent (see `psam`); the default
rho (the paper tunes rho per model size; here 0.05 as SAM). Cost: 2 passes, +1 buffer (e) and the
logits-sized dz.
"""

import torch

from ..losses import model_logits
from . import psam as _psam
from .registry import Facts, register

ASCENTS = ("raw", "adam")
USER = "variant='functional_sam' (it backpropagates through the logits)"


def on_setup(trainer):
    if trainer.sam_config.functional_sam_ascent != "adam":
        return
    try:
        _psam.on_setup(trainer)
    except ValueError as err:
        raise ValueError(f"functional_sam_ascent='adam' (as {err})") from None


def functional_sam(ctx):
    store = {}

    def capture(compute, model, inputs, num_items_in_batch):  # clean pass: keep dL/dlogits at w
        loss, outputs = compute(inputs)
        logits = model_logits(outputs, USER)
        (dz,) = torch.autograd.grad(loss, logits, retain_graph=True, allow_unused=True)
        if dz is None:
            raise ValueError("variant='functional_sam': the training loss does not depend on outputs['logits'].")
        store["dz"] = dz.detach()
        return loss, outputs

    def replay(compute, model, inputs, num_items_in_batch):  # descent pass: J(w + e)^T dz
        loss, outputs = compute(inputs)
        logits = model_logits(outputs, USER)
        dz = store.pop("dz")
        if logits.shape != dz.shape:
            raise RuntimeError(f"variant='functional_sam': logits changed shape between the passes "
                               f"({tuple(dz.shape)} -> {tuple(logits.shape)}).")
        surrogate = (logits * dz.to(logits.dtype)).sum()
        return loss.detach() + (surrogate - surrogate.detach()), outputs  # value L(w + e), gradient J^T dz

    g = ctx.grad(loss_hook=capture)             # clean pass at w (per device), dz stored
    u = _psam.precondition(ctx, g) if ctx.config.functional_sam_ascent == "adam" else None
    e = ctx.ascent(g if u is None else u, inplace=True)
    del g, u
    ctx.grad(at=e, final=True, release=True, loss_hook=replay)


FUNCTIONAL_SAM_FACTS = Facts(
    paper="Singh, Mobahi, Agarwala, Dauphin, *Avoiding spurious sharpness minimization broadens applicability of "
          "SAM*, ICML 2025, [2502.02407](https://arxiv.org/abs/2502.02407): descent J(w + e)^T dL/df(w) (the "
          "output gradient of the clean pass)",
    settings="`rho`, `functional_sam_ascent` (raw | adam, as `psam`; which the paper uses per run is unverified)",
    passes="2",
    memory="1 (e) + one logits-sized dL/dlogits",
)


register("functional_sam", paper=_psam.PSAM_PAPER, on_setup=on_setup, trainer_only=True,
         facts=FUNCTIONAL_SAM_FACTS)(functional_sam)
