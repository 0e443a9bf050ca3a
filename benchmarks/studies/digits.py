"""The digits MLP shared by label_noise and mupp_transfer: data, model, one in-process SAMTrainer run.

Data: sklearn's 8x8 digits (1797 images, offline), pixels / 16, a fixed stratified 70/30 split
(split seed 0). Symmetric label noise at rate p: a random p of the training labels (exactly
round(p * n)) are replaced by a uniformly drawn *different* class; the test labels stay clean.

The training loop is SAMTrainer's own (AdamW, cosine schedule, batch 32). Cost is the wall and process
CPU time of the whole training loop (no timer inside a step: a `time.process_time` call costs about a
millisecond on the machines this ran on, as much as a step), and hooks on the model count forward
passes and backward passes through the logits per optimizer step, so cost is measured, not assumed.
With `val_fraction`, a validation split is carved from the noisy training data and a callback scores
validation and test after every epoch (outside the timed loop), so the epoch can be chosen by the
noisy validation split as a user would (benchmarks/README.md, the protocol).
"""

import math
import tempfile
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

from hf_sam import SAMConfig, SAMTrainer, SAMTrainingArguments


def load_digits_split(noise, seed, split_seed=0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from hf_sam_scripts.data import symmetric_label_noise

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=split_seed, stratify=y)
    y_noisy, _ = symmetric_label_noise(y_tr, noise, seed, 10)
    return x_tr, y_noisy, y_tr, x_te, y_te


def carve_validation(x_tr, y_noisy, y_clean, fraction, split_seed=0):
    """A validation split carved from the *noisy* training data: a random `fraction` of it (membership fixed by
    split_seed), with its noisy labels, as a user would hold it. Returns (x_tr, y_noisy, y_clean, x_val, y_val_noisy)."""
    rng = np.random.default_rng(split_seed)
    order = rng.permutation(len(y_noisy))
    n_val = int(round(fraction * len(y_noisy)))
    val, tr = order[:n_val], np.sort(order[n_val:])
    return x_tr[tr], y_noisy[tr], y_clean[tr], x_tr[val], y_noisy[val]


class ArrayDataset(Dataset):
    def __init__(self, x, y, with_index=False):
        self.x = torch.as_tensor(x)
        self.y = torch.as_tensor(y, dtype=torch.long)
        self.with_index = with_index

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        item = {"x": self.x[i], "labels": self.y[i]}
        if self.with_index:
            item["sample_index"] = i
        return item


class MLP(nn.Module):
    """64 -> width -> width -> 10 with ReLU. parametrization "sp": PyTorch's default init.
    "mup" (muP written by hand, the "a0" form: no multipliers): input and hidden weights std
    1/sqrt(fan_in), readout std sqrt(base_width)/width (variance ~ 1/width^2), biases 0; with Adam the
    hidden and readout learning rates are scaled by base_width/width (see `mup_param_groups`)."""

    def __init__(self, width=256, depth=2, parametrization="sp", base_width=64):
        super().__init__()
        dims = [64] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(width, 10)
        if parametrization == "mup":
            for layer in self.hidden:
                nn.init.normal_(layer.weight, std=1.0 / math.sqrt(layer.in_features))
                nn.init.zeros_(layer.bias)
            nn.init.normal_(self.head.weight, std=math.sqrt(base_width) / width)
            nn.init.zeros_(self.head.bias)

    def forward(self, x, labels=None):
        h = x
        for layer in self.hidden:
            h = torch.relu(layer(h))
        logits = self.head(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def mup_param_groups(model, lr, ratio):
    """Adam muP: input weights and every bias at lr, hidden and readout weights at lr * base/width."""
    scaled = [p for n, p in model.named_parameters() if n.endswith("weight") and not n.startswith("hidden.0.")]
    ids = {id(p) for p in scaled}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": rest, "lr": lr}, {"params": scaled, "lr": lr * ratio}]


# muP^2 roles of the MLP's parameters (regex -> role), for SAMConfig(mupp_roles=...)
MUPP_ROLES = {r"^hidden\.0\.": "input", r"^hidden\.\d+\.bias$": "input", r"^hidden\.\d+\.weight$": "hidden",
              r"^head\.weight$": "output", r"^head\.bias$": "fixed"}


class EpochEval(TrainerCallback):
    """At the end of every epoch: accuracy and loss on the (noisy) validation split and the clean test split, in
    one no-grad forward each. Its own wall and CPU time are kept, so that the training loop's time excludes it."""

    def __init__(self, model, splits):
        self.model, self.splits = model, splits
        self.curve, self.wall, self.cpu = [], 0.0, 0.0

    def on_epoch_end(self, args, state, control, **kw):
        t0, c0 = time.perf_counter(), time.process_time()
        was_training = self.model.training
        self.model.eval()
        row = {"epoch": round(state.epoch)}
        with torch.no_grad():
            for name, (x, y) in self.splits.items():
                logits = self.model(x)["logits"]
                row[f"{name}_acc"] = float((logits.argmax(-1) == y).float().mean())
                row[f"{name}_loss"] = float(nn.functional.cross_entropy(logits, y))
        self.model.train(was_training)
        self.curve.append(row)
        self.wall += time.perf_counter() - t0
        self.cpu += time.process_time() - c0


def best_epoch(curve):
    """The epoch the noisy validation split picks: highest validation accuracy, ties to the lower validation loss
    (early stopping with the best checkpoint restored)."""
    return max(curve, key=lambda r: (r["val_acc"], -r["val_loss"]))


class PassCounter:
    """Counts training-mode forwards, and backward passes that reach the logits."""

    def __init__(self, model):
        self.forwards = self.backwards = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if not module.training:
            return
        self.forwards += 1
        logits = out["logits"]
        if logits.requires_grad:
            logits.register_hook(self._count_backward)

    def _count_backward(self, grad):
        self.backwards += 1


def train_mlp(sam, *, noise, seed, epochs, width=256, lr=1e-3, batch_size=32, weight_decay=0.0,
              parametrization="sp", base_width=64, mupp=None, val_fraction=0.0):
    """One training run. sam: None (plain AdamW: SAMTrainer with rho 0, the stock step) or SAMConfig kwargs.

    val_fraction > 0 carves a validation split from the noisy training data and evaluates validation and test
    after every epoch: the result then also holds the curve and the test accuracy at the epoch the validation
    split picks (`best_epoch`). Cost: wall and process CPU time of the whole training loop, less the per-epoch
    evaluation (no timer inside a step)."""
    sam = dict(sam or {}, **(mupp or {})) if (sam or mupp) else None
    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    x_tr, y_noisy, y_clean_tr, x_te, y_te = load_digits_split(noise, seed)
    evaluator = None
    if val_fraction:
        x_tr, y_noisy, y_clean_tr, x_val, y_val = carve_validation(x_tr, y_noisy, y_clean_tr, val_fraction)
    cfg = SAMConfig(rho=0.0) if sam is None else SAMConfig(**sam)
    needs_index = cfg.variant == "saf"  # SAF reads each sample's position; MESA does not
    train = ArrayDataset(x_tr, y_noisy, with_index=needs_index)
    model = MLP(width, parametrization=parametrization, base_width=base_width)
    optimizers = (None, None)
    if parametrization == "mup":  # muP with Adam: hidden and readout LR ~ base/width
        optimizers = (torch.optim.AdamW(mup_param_groups(model, lr, base_width / width), lr=lr,
                                        weight_decay=weight_decay), None)
    counter = PassCounter(model)
    callbacks = []
    if val_fraction:
        as_tensors = lambda x, y: (torch.as_tensor(x), torch.as_tensor(y, dtype=torch.long))  # noqa: E731
        evaluator = EpochEval(model, {"val": as_tensors(x_val, y_val), "test": as_tensors(x_te, y_te)})
        callbacks.append(evaluator)
    with tempfile.TemporaryDirectory() as tmp:
        args = SAMTrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batch_size, per_device_eval_batch_size=1024,
            num_train_epochs=epochs, learning_rate=lr, weight_decay=weight_decay, optim="adamw_torch",
            lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=0.0, report_to=[], use_cpu=True,
            save_strategy="no", eval_strategy="no", logging_strategy="no", seed=seed, data_seed=seed,
            disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=not needs_index)
        trainer = SAMTrainer(model=model, args=args, train_dataset=train, sam_config=cfg, callbacks=callbacks,
                             optimizers=optimizers)
        t0, c0 = time.perf_counter(), time.process_time()
        result = trainer.train()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if evaluator is not None:
            wall, cpu = wall - evaluator.wall, cpu - evaluator.cpu
        steps = result.global_step
        counter.handle.remove()
        forwards, backwards = counter.forwards, counter.backwards
        test = trainer.predict(ArrayDataset(x_te, y_te))
        train_pred = trainer.predict(ArrayDataset(x_tr, y_clean_tr))
    pred_te = test.predictions.argmax(-1)
    pred_tr = train_pred.predictions.argmax(-1)
    noisy = y_noisy != y_clean_tr
    out = {
        "test_acc": float((pred_te == y_te).mean()),
        "train_acc_clean_labels": float((pred_tr == y_clean_tr).mean()),
        "memorised_noisy_labels": float((pred_tr[noisy] == y_noisy[noisy]).mean()) if noisy.any() else None,
        "test_loss": float(nn.functional.cross_entropy(torch.as_tensor(test.predictions), torch.as_tensor(y_te))),
        "steps": steps,
        "train_wall_s": wall,
        "train_cpu_s": cpu,
        "forwards_per_step": forwards / steps,
        "backwards_per_step": backwards / steps,
    }
    if evaluator is not None:
        best = best_epoch(evaluator.curve)
        out.update(best_epoch=best["epoch"], val_acc_best=best["val_acc"], val_loss_best=best["val_loss"],
                   test_acc_best=best["test_acc"], test_loss_best=best["test_loss"],
                   curve={k: [round(r[k], 5) for r in evaluator.curve] for k in ("val_acc", "test_acc")})
    return out
