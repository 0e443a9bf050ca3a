"""SAF: Sharpness-Aware training for Free (a trajectory loss; no weight perturbation).

Jiawei Du, Daquan Zhou, Jiashi Feng, Vincent Y. F. Tan, Joey Tianyi Zhou. "Sharpness-Aware Training
for Free", NeurIPS 2022, arXiv 2205.14083 (code: AngusDujw/SAF, SAF_train.py).

One pass per micro-batch with the loss

    L = CE(z, y) + lambda * T^2 * mean_b KL( softmax(z_ref,b / T) || softmax(z_b / T) )

z = the current logits (train mode), KL summed over classes and averaged over the micro-batch.
z_ref = the logits the same sample produced `saf_lag` (E~) epochs earlier, read from a host bank
bank[N, E~ + 1, C]: every step writes the current logits at slot (epoch mod (E~ + 1)) and reads slot
((epoch - E~) mod (E~ + 1)). The KL term is active in epochs e > saf_start (strict, 0-based epochs, as
the code's `epoch > kl_start_epoch`) once e >= E~ (so that the read slot was written). The official
E_end (300) is not modelled (the term stays on until the end). `rho` is not used: rho = 0 gives the
stock step (the index column is still popped; no bank, no KL), any other rho than the default is refused.

Defaults (official code): lambda = 0.16 (`saf_lambda`; README: 0.3), T = 5 (`saf_temperature`),
E_start = 5 (`saf_start`), E~ = 3 (`saf_lag`; run.sh: 2).

Sample indices: the training dataset must have a column `sample_index` with each sample's position
(0 <= index < len(dataset)); set-up fails clearly without it. The column is kept through
`remove_unused_columns` (SAMTrainer adds it to the Trainer's signature columns) and popped from the
inputs before the forward, so the model never sees it; if your Trainer version does not allow that,
set `remove_unused_columns=False`. Keep `sample_index` out of evaluation datasets.

Supports classification logits of shape [batch, classes] (an LM's [batch, seq, vocab] bank would not
fit in memory; refused with a clear error). The bank lives in host memory (N (E~+1) C fp32 values) and
is saved in sam_state.pt (per process in multi-process runs: each process fills its own shard).
The sharpness-aware gates `interval`, `start`, `end` do not apply (refused). With token-count loss
normalisation (`num_items_in_batch`) the KL term is divided by the accumulation steps like a mean loss.

Cost: 1 pass; host memory N (E~+1) C floats; one device->host copy of the logits per step.
"""

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..losses import model_logits
from .common import keep_column, refuse_ascent_shaping
from .registry import Facts, register

SAF_PAPER = {
    "title": "Sharpness-Aware Training for Free",
    "authors": "Jiawei Du, Daquan Zhou, Jiashi Feng, Vincent Y. F. Tan, Joey Tianyi Zhou",
    "venue": "NeurIPS 2022",
    "arxiv": "2205.14083",
    "bibtex": """@inproceedings{du2022sharpness,
  title={Sharpness-Aware Training for Free},
  author={Du, Jiawei and Zhou, Daquan and Feng, Jiashi and Tan, Vincent Y. F. and Zhou, Joey Tianyi},
  booktitle={Advances in Neural Information Processing Systems},
  year={2022},
  url={https://arxiv.org/abs/2205.14083}
}""",
}

INDEX_COLUMN = "sample_index"
BANK = "saf_bank"


# ---- shared with MESA --------------------------------------------------------------------------
def current_epoch(ctx) -> int:
    """0-based index of the epoch the current step belongs to."""
    return int(math.floor(ctx.epoch + 1e-9))


def classification_logits(outputs, variant) -> torch.Tensor:
    """The model's classification logits [batch, classes] (hf_sam.losses.model_logits, shape checked)."""
    logits = model_logits(outputs, f"variant={variant!r}")
    if logits.dim() != 2:
        raise ValueError(f"variant={variant!r} supports classification logits of shape [batch, classes]; the model "
                         f"returned logits of shape {tuple(logits.shape)}.")
    return logits


def kl_term(trainer, logits, ref, temperature, num_items_in_batch) -> torch.Tensor:
    """T^2 * mean_b KL(softmax(ref/T) || softmax(logits/T)), scaled like the Trainer scales a mean loss."""
    t = float(temperature)
    log_q = F.log_softmax(logits.float() / t, dim=-1)
    p = F.softmax(ref.float() / t, dim=-1)
    kl = F.kl_div(log_q, p, reduction="none").sum(-1).mean() * (t * t)
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) \
            or getattr(trainer, "compute_loss_func", None) is not None
    if scaled:  # the Trainer will not divide this pass's loss by the accumulation steps: do it here
        kl = kl / float(trainer.current_gradient_accumulation_steps or 1)
    return kl


def check_trajectory_config(name):
    def check(config):
        if config.interval != 1 or config.start != 0.0 or config.end != 1.0:
            raise ValueError(f"variant={name!r} adds a loss term on every step; interval, start and end do not apply "
                             f"(got interval={config.interval}, start={config.start}, end={config.end}).")
        refuse_ascent_shaping(config, "it does not perturb the weights")
    return check


# ---- SAF ---------------------------------------------------------------------------------------
def _has_index(dataset):
    """True / False when the dataset tells, None when it cannot be checked cheaply (iterable)."""
    try:
        import datasets

        if isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
            names = dataset.column_names
            return None if names is None else INDEX_COLUMN in names
    except ImportError:
        pass
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__"):
        return None
    try:
        if len(dataset) == 0:
            return None
        item = dataset[0]
    except Exception:  # noqa: BLE001 - an unusual dataset: check at the first step instead
        return None
    return isinstance(item, Mapping) and INDEX_COLUMN in item


def on_setup(trainer):
    if trainer.train_dataset is not None and _has_index(trainer.train_dataset) is False:
        raise ValueError(f"variant='saf' needs each training sample's position: add a column {INDEX_COLUMN!r} "
                         f"(0 .. len(dataset) - 1) to the training dataset, e.g. "
                         f"dataset.map(lambda ex, i: {{'{INDEX_COLUMN}': i}}, with_indices=True).")
    if trainer.args.remove_unused_columns and not keep_column(trainer, INDEX_COLUMN):
        raise ValueError(f"variant='saf' needs the column {INDEX_COLUMN!r}, which remove_unused_columns=True "
                         "would drop; set remove_unused_columns=False.")


def _bank(ctx, rows_needed, classes, slots):
    st = ctx.state
    bank = st.get(BANK)
    if bank is not None and bank.device.type != "cpu":  # loaded from a checkpoint onto the device
        bank = bank.cpu()
    if bank is None:
        try:
            size = len(ctx.trainer.train_dataset)
        except TypeError:
            size = 0
        bank = torch.zeros(max(size, rows_needed), slots, classes, dtype=torch.float32)
    if bank.shape[1:] != (slots, classes):
        raise ValueError(f"variant='saf': the logit bank has shape {tuple(bank.shape)} but this run needs "
                         f"[N, {slots}, {classes}] (saf_lag or the number of classes changed).")
    if bank.shape[0] < rows_needed:
        bank = torch.cat([bank, bank.new_zeros(rows_needed - bank.shape[0], slots, classes)])
    st[BANK] = bank
    return bank


def saf(ctx):
    trainer, cfg = ctx.trainer, ctx.config
    lam = float(cfg.saf_lambda)
    lag = int(cfg.saf_lag)
    epoch = current_epoch(ctx)
    active = epoch > cfg.saf_start and epoch >= lag

    def hook(compute, model, inputs, num_items_in_batch):
        if INDEX_COLUMN not in inputs:
            raise ValueError(f"variant='saf' needs the column {INDEX_COLUMN!r} in every training batch; it is missing "
                             "(add it to the dataset, and set remove_unused_columns=False if a collator drops it).")
        inputs = dict(inputs)
        index = inputs.pop(INDEX_COLUMN).reshape(-1).long().cpu()
        loss, outputs = compute(inputs)
        if cfg.rho == 0:  # every variant's off switch: the stock step
            return loss, outputs
        logits = classification_logits(outputs, "saf")
        if index.numel() != logits.shape[0] or (index.numel() and int(index.min()) < 0):
            raise ValueError(f"variant='saf': {INDEX_COLUMN!r} must hold one non-negative index per sample.")
        bank = _bank(ctx, int(index.max()) + 1 if index.numel() else 0, logits.shape[-1], lag + 1)
        bank[index, epoch % (lag + 1)] = logits.detach().float().cpu()
        if active and lam != 0:
            ref = bank[index, (epoch - lag) % (lag + 1)].to(logits.device)
            loss = loss + lam * kl_term(trainer, logits, ref, cfg.saf_temperature, num_items_in_batch)
        return loss, outputs

    ctx.grad(final=True, loss_hook=hook)


SAF_FACTS = Facts(
    paper="Du et al., *Sharpness-Aware Training for Free*, NeurIPS 2022, "
          "[2205.14083](https://arxiv.org/abs/2205.14083)",
    settings="`saf_lambda` (0.16), `saf_temperature` (5), `saf_start` (5 epochs), `saf_lag` (3 epochs); no radius (`rho` 0 = stock step, other values refused); "
             "needs a `sample_index` column",
    passes="1",
    memory="0 (+ host logit bank N·(lag+1)·C floats)",
)


register("saf", passes=1, uses_rho=False, rho_note="its strength is saf_lambda", paper=SAF_PAPER,
         check=check_trajectory_config("saf"),
         on_setup=on_setup, facts=SAF_FACTS)(saf)
