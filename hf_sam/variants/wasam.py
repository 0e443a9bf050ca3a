"""WASAM: SAM with stochastic weight averaging (SWA) of its iterates.

Jean Kaddour, Linqing Liu, Ricardo Silva, Matt J. Kusner. "When Do Flat Minima Optimizers Work?",
NeurIPS 2022, arXiv 2202.00661 (code: JeanKaddour/WASAM, wasam.py).

    every optimizer step: the SAM step (g = grad L(w); e = rho g/||g||; descend with grad L(w + e))
    averaging, on the weights after optimizer step s (s = global_step after the step):
        if s > swa_start * max_steps  and (s completes an epoch or is the last step, or
                                            s % swa_interval == 0 when swa_interval >= 1):
            n <- n + 1;  w_bar <- w_bar + (w - w_bar) / n
    evaluation (`evaluate`, `predict`) and `save_model` outside training use w_bar (once n > 0):
    the trainable weights are swapped to w_bar, BatchNorm statistics are recomputed with one pass over
    the training set in order (as the official `bn_update`), and everything is put back afterwards.

`wasam_swa_start` is a fraction of `max_steps` (default 0.75, the paper's 0.75 E: with E epochs and
averaging at epoch ends this averages exactly the epochs >= floor(0.75 E), as the official code).
`wasam_swa_interval`: 0 (default) averages once per epoch at its end, as the paper (plus the last
step when max_steps ends training inside an epoch); k >= 1 averages every k optimizer steps (useful
for one-epoch fine-tuning).

Checkpoints written *during* training hold the current (training) weights, so that a resumed run
continues exactly; the average and its count are in sam_state.pt. A `save_model` / `push_to_hub`
after `train()` returns writes the averaged weights. Averages are kept in fp32 for bf16/fp16
parameters. Only trainable parameters are averaged (frozen ones do not change).

Cost: 2 passes per step (SAM), +1 parameter copy (the average), + one BatchNorm pass per evaluation
for models with BatchNorm.
"""

from contextlib import contextmanager

import torch
from transformers import TrainerCallback

from .. import ops
from .common import training_batches
from .registry import Facts, register
from .sam import sam

WASAM_PAPER = {
    "title": "When Do Flat Minima Optimizers Work?",
    "authors": "Jean Kaddour, Linqing Liu, Ricardo Silva, Matt J. Kusner",
    "venue": "NeurIPS 2022",
    "arxiv": "2202.00661",
    "bibtex": """@inproceedings{kaddour2022when,
  title={When Do Flat Minima Optimizers Work?},
  author={Kaddour, Jean and Liu, Linqing and Silva, Ricardo and Kusner, Matt J.},
  booktitle={Advances in Neural Information Processing Systems},
  year={2022},
  url={https://arxiv.org/abs/2202.00661}
}""",
}

AVG, COUNT = "wasam_avg", "wasam_n"


def averaged_params(trainer) -> list[torch.Tensor]:
    """The parameters WASAM averages: the trainable ones, in model.named_parameters() order."""
    return [p for _, p in trainer.model.named_parameters() if p.requires_grad]


def update_average(trainer) -> None:
    """Fold the current weights into the running average if this step is due (see module docstring)."""
    cfg, state = trainer.sam_config, trainer.state
    total = state.max_steps or 0
    if total <= 0 or not state.global_step > cfg.wasam_swa_start * total:
        return
    params = averaged_params(trainer)
    st = trainer.sam_state
    with torch.no_grad():
        current = [p.detach().float() if p.dtype in (torch.float16, torch.bfloat16) else p.detach() for p in params]
        if AVG not in st or st.get(COUNT, 0) == 0:
            st[AVG] = [x.clone() for x in current]
            st[COUNT] = 1
            return
        n = st[COUNT] + 1
        diff = torch._foreach_sub(current, st[AVG])
        torch._foreach_mul_(diff, 1.0 / n)
        torch._foreach_add_(st[AVG], diff)
        st[COUNT] = n


class WASAMCallback(TrainerCallback):
    """Averages after optimizer steps (or epoch ends) and marks when training is running."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        # Runs before the step's checkpoint is written, so a checkpoint always holds the average of the
        # steps before it (averaging in on_epoch_end would miss an epoch-end checkpoint).
        k = self.trainer.sam_config.wasam_swa_interval
        if k >= 1:
            due = state.global_step % k == 0
        else:  # the step that completes an epoch, or the last step of training
            epoch = state.epoch or 0.0
            due = abs(epoch - round(epoch)) < 1e-9 or state.global_step == state.max_steps
        if due:
            update_average(self.trainer)


def recompute_batchnorm(trainer, bns) -> None:
    """The official bn_update: reset the running statistics, then one pass over the training set in
    train mode with momentum b / (n + b) (an exact average over the batches)."""
    model = trainer.model
    was_training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.running_mean.zero_()
        m.running_var.fill_(1.0)
    model.train()
    seen = 0
    try:
        with torch.no_grad():
            for batch in training_batches(trainer):
                first = next((v for v in batch.values() if torch.is_tensor(v)), None)
                b = int(first.shape[0]) if first is not None else 1
                for m in bns:
                    m.momentum = b / float(seen + b)
                model(**batch)
                seen += b
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)


@contextmanager
def use_average(trainer):
    """Swap the averaged weights in (and recompute BatchNorm statistics), put everything back after."""
    st = trainer.sam_state
    if not st.get(COUNT):
        yield
        return
    params = averaged_params(trainer)
    if len(params) != len(st[AVG]):
        raise RuntimeError(f"WASAM average has {len(st[AVG])} tensors but the model has {len(params)} trainable "
                           "parameters; was the model changed after training?")
    bns = ops.batchnorms(trainer.model)
    # the weights, the BatchNorm statistics and the training RNG (the BatchNorm pass draws) come back after
    with ops.isolated(params + ops.batchnorm_buffers(bns)):
        with torch.no_grad():
            for p, a in zip(params, st[AVG]):
                p.copy_(a)
        if bns:
            recompute_batchnorm(trainer, bns)
        yield


@contextmanager
def _evaluate_hook(trainer):
    with use_average(trainer):
        yield


@contextmanager
def _save_hook(trainer):
    if trainer.is_in_train:  # a checkpoint: keep the training weights for resume
        yield
        return
    with use_average(trainer):
        yield


def on_setup(trainer):
    trainer.add_callback(WASAMCallback(trainer))


WASAM_FACTS = Facts(
    paper="Kaddour, Liu, Silva, Kusner, *When Do Flat Minima Optimizers Work?*, NeurIPS 2022, "
          "[2202.00661](https://arxiv.org/abs/2202.00661)",
    settings="`rho`, `wasam_swa_start` (0.75 of max_steps), `wasam_swa_interval` (0 = once per epoch)",
    passes="2 (+ one BatchNorm pass per evaluation for BN models)",
    memory="2 (SWA average, snapshot)",
)


register("wasam", paper=WASAM_PAPER, on_setup=on_setup,
         hooks={"evaluate": _evaluate_hook, "save_model": _save_hook}, facts=WASAM_FACTS)(sam)
