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

Reported loss: the clean L(w), as every variant (the curves stay comparable with SAM's). No pass of
R-SAM runs at w, so in SAMTrainer the first pass's loss hook runs one extra no-grad forward at w (the
weights are put back at w from the exact snapshot, then at w + delta again; the same dropout masks as
the passes; BatchNorm statistics updated once, at w, as in the stock step; before this forward they
took the update at w + delta), scaled like the pass's own loss. Cost: +1 forward without backward
(about a third of a pass). `sam/sharpness` is then L(w + delta) - L(w). hf_sam.SAM (closure
front-end) cannot run loss hooks: there `step` returns the descent pass's L(w + e) (sigma = 0: the
clean L(w), as SAM).

Noise: a `torch.Generator` seeded from (seed, global_step, micro-step, rank); see
`hf_sam.variants.common.noise_seed`. Cost: 2 sequential passes; buffers delta, e, snapshot of w.
"""

import torch

from .. import ops
from .registry import Facts, register
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


def clean_loss_hook(ctx, at, store):
    """Loss hook for a first pass away from w (at w + at): also measure L(w), without a backward.

    The weights go back to w from the step's exact snapshot and then to w + at again (the same bits as
    the pass would see); the pass's forward replays the RNG state the clean forward started from (same
    dropout masks); BatchNorm statistics keep the clean forward's update only (the stock step's).
    store["clean"], store["pass"]: the unscaled losses at w and at w + at; store["bn"]: the statistics
    after the clean forward, which `report_clean_loss` puts back once the pass's backward has run.
    """
    def hook(compute, model, inputs, num_items_in_batch):
        rng = ops.rng_state()
        ctx.move_to(None)
        try:
            with torch.no_grad():
                clean, _ = compute(inputs)
        finally:
            ctx.move_to(at)
        bn = ops.snapshot(ctx.selection.batchnorms) if ctx.selection.batchnorms else None
        ops.set_rng_state(rng)
        loss, outputs = compute(inputs)
        store["clean"], store["pass"], store["bn"] = clean.detach(), loss.detach(), bn
        return loss, outputs
    return hook


def report_clean_loss(ctx, store) -> None:
    """After the hooked pass: ctx.clean_loss = L(w) from `clean_loss_hook`, scaled as the front-end scaled
    the pass's loss; the BatchNorm statistics back at the clean forward's update."""
    if store.get("bn") is not None:
        ops.restore_(ctx.selection.batchnorms, store["bn"])
    if "clean" not in store or ctx.last_loss is None:
        return
    scaled, raw, clean = ctx.last_loss.detach(), store["pass"].to(ctx.last_loss.device), store["clean"]
    factor = torch.where(raw != 0, scaled.float() / raw.float(), torch.ones_like(scaled, dtype=torch.float32))
    ctx.clean_loss = (clean.to(scaled.device).float() * factor).to(scaled.dtype)


def rsam(ctx):
    sigma = float(ctx.config.rsam_sigma)
    store = {}
    if sigma == 0:
        delta = None
    else:
        noise = Noise(ctx)
        delta = random_perturbation(ctx, lambda p: noise.normal(p).mul_(sigma))
    hook = clean_loss_hook(ctx, delta, store) if delta is not None and ctx.trainer is not None else None
    g = ctx.grad(at=delta, loss_hook=hook)      # pass at the noisy point w + delta (+ a no-grad forward at w)
    report_clean_loss(ctx, store)
    e = ctx.ascent(g, inplace=True)             # rho * g~ / ||g~||
    if delta is not None:
        pairs = [(x, y) for x, y in zip(e, delta) if x is not None and y is not None]
        if pairs:
            torch._foreach_add_([x for x, _ in pairs], [y for _, y in pairs])
        e = [y if x is None else x for x, y in zip(e, delta)]
    del g, delta
    ctx.grad(at=e, final=True, release=True)    # descent at w + delta + rho g~/||g~||


RSAM_FACTS = Facts(
    paper="Liu et al., *Random Sharpness-Aware Minimization*, NeurIPS 2022 "
          "([OpenReview](https://openreview.net/forum?id=htUvh7xPoa)); **equations unverified**",
    settings="`rho`, `rsam_sigma` (0.01; 0 = SAM)",
    passes="2 + 1 no-grad forward at w (the logged L(w); SAMTrainer)",
    memory="2 (noise / e, snapshot)",
)


register("rsam", facts=RSAM_FACTS, paper=RSAM_PAPER)(rsam)
