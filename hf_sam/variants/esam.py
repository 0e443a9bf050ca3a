"""ESAM: Efficient Sharpness-Aware Minimization.

Paper: Jiawei Du, Hanshu Yan, Jiashi Feng, Joey Tianyi Zhou, Liangli Zhen, Rick Siow Mong Goh,
Vincent Y. F. Tan. "Efficient Sharpness-aware Minimization for Improved Training of Neural
Networks", ICLR 2022, arXiv 2110.03141. Reference: dydjw9/Efficient_SAM, utils/Esam.py.

Two savings, per micro-batch B of n samples:
- Stochastic weight perturbation (SWP): each perturbed parameter tensor is kept with probability
  beta (the official per-tensor form; the paper's text has a per-coordinate mask). The clean pass
  computes gradients for the kept set S only (the others have requires_grad off during that
  pass, which is what saves backward compute), and
      e = rho * g_S / (beta * (||g_S|| + eps))      on S, 0 elsewhere.
- Sharpness-sensitive data selection (SDS): per-sample losses l_i(w) (clean pass) and l_i(w + e)
  (a no-grad forward of the whole micro-batch at w + e); B+ = the k = max(1, floor(gamma * n))
  samples with the largest l_i(w + e) - l_i(w). The descent pass runs forward and backward on
  B+ only:  descend with grad of  c * mean_{i in B+} l_i(w + e).
  (The official code keeps the samples strictly above the k-th largest increase, one fewer.)

Loss scaling (GA / num_items_in_batch): the descent loss goes through the stock training_step
like any other pass, so the GA division or token normalisation is applied after it. Per-sample
losses are plain losses recomputed from logits (hf_sam.losses.per_sample_loss: classification,
causal LM); to carry the stock loss's normalisation, the mean over B+ is multiplied by the
detached factor c = L_stock(w + e) / mean_i l_i(w + e) of the full micro-batch (c = 1 for a
mean-reduced classification loss). gamma = 1 (k = n) skips SDS and runs the stock descent pass;
beta = gamma = 1 is SAM exactly.

Randomness: one uniform number per perturbed tensor per micro-batch, in the optimizer's parameter
order (kept if < beta), from the micro-batch's private generator (hf_sam.variants.common.Noise:
seeded with a hash of (seed, global_step, micro-batch index), the same on every process), so a
resumed run draws the same masks and the global RNG (dropout, data order) is untouched. A draw that
keeps no tensor gives a plain one-pass step.

Defaults: beta 0.5, gamma 0.5 (run.sh: beta 0.5-0.6, gamma 0.5; class defaults 1 = SAM).
Cost: clean pass (backward for ~beta of the tensors) + 1 no-grad forward + 1 pass on
gamma * n samples; +1 gradient-sized buffer, + per-sample loss vectors. Toggling requires_grad
recompiles torch.compile graphs; with `sync_ascent=True` on several processes (a DDP-synced
clean pass) all tensors keep their gradients and the unkept ones are dropped instead.
"""

import math

import torch

from ..losses import batch_size, per_sample_loss, select_samples
from .common import Noise
from .registry import Facts, register

ESAM_PAPER = {
    "title": "Efficient Sharpness-aware Minimization for Improved Training of Neural Networks",
    "authors": "Jiawei Du, Hanshu Yan, Jiashi Feng, Joey Tianyi Zhou, Liangli Zhen, Rick Siow Mong Goh, "
               "Vincent Y. F. Tan",
    "venue": "ICLR 2022",
    "arxiv": "2110.03141",
    "bibtex": """@inproceedings{du2022efficient,
  title={Efficient Sharpness-aware Minimization for Improved Training of Neural Networks},
  author={Du, Jiawei and Yan, Hanshu and Feng, Jiashi and Zhou, Joey Tianyi and Zhen, Liangli and Goh, Rick Siow Mong and Tan, Vincent Y. F.},
  booktitle={International Conference on Learning Representations},
  year={2022},
  url={https://arxiv.org/abs/2110.03141}
}""",
}


def selected_count(gamma, n) -> int:
    """k = max(1, floor(gamma * n)): the samples kept by the data selection."""
    return min(n, max(1, math.floor(gamma * n + 1e-9)))


def _capture_clean(store):
    def hook(compute, model, inputs, num_items_in_batch):
        loss, outputs = compute(inputs)
        store["before"] = per_sample_loss(outputs, inputs, model).detach()
        return loss, outputs
    return hook


def _select(before, k):
    """Loss hook of the descent pass: the k samples whose loss rose most, at the stock normalisation."""
    def hook(compute, model, inputs, num_items_in_batch):
        with torch.no_grad():
            full, outputs = compute(inputs)
            after = per_sample_loss(outputs, inputs, model)
            increase = after - before.to(after.device)
            chosen = torch.topk(increase, k).indices.sort().values
            mean = after.mean()
            c = torch.where(mean != 0, full.detach().float() / mean, torch.ones_like(mean))
        sub = select_samples(inputs, chosen)
        _, sub_outputs = compute(sub)
        loss = per_sample_loss(sub_outputs, sub, model).mean() * c
        return loss, sub_outputs
    return hook


def esam(ctx):
    cfg = ctx.config
    sel = ctx.selection.selected
    perturbable = [i for i, s in enumerate(sel) if s]
    draws = Noise(ctx, per_process=False).rand(len(perturbable))    # one per perturbed tensor
    kept = {i for i, u in zip(perturbable, draws.tolist()) if u < cfg.esam_beta}
    if not kept:
        ctx.grad(final=True)                                  # nothing perturbed: a plain step
        return

    n = batch_size(ctx.inputs)
    k = selected_count(cfg.esam_gamma, n)
    store = {}
    g = ctx.grad(loss_hook=_capture_clean(store) if k < n else None, only=kept)   # clean pass, grads on S
    e = ctx.ascent(g, rho=cfg.rho / cfg.esam_beta, inplace=True)           # rho g_S / (beta ||g_S||)
    del g
    hook = _select(store["before"], k) if k < n else None                  # descent on B+
    ctx.grad(at=e, final=True, loss_hook=hook, release=True)


ESAM_FACTS = Facts(
    paper="Du et al., *Efficient Sharpness-aware Minimization for Improved Training of Neural Networks*, ICLR "
          "2022, arXiv 2110.03141",
    settings="`esam_beta` (0.5), `esam_gamma` (0.5)",
    passes="clean pass with backward on ~beta of the tensors + 1 no-grad forward + 1 pass on gamma * n samples "
           "(measured: 2 passes over 1.5 micro-batches of samples, 1 no-grad forward)",
    memory="per-sample loss vectors",
)


register("esam", trainer_only=True, paper=ESAM_PAPER, facts=ESAM_FACTS)(esam)
