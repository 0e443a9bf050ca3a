"""Model outputs, per-sample losses and sub-batches, for variants that look at a model's outputs or
at individual samples (ESAM's data selection, SSAM's Fisher mask, SAF's logit bank).

The one place that reads a model's logits (`model_logits`) and unwraps a model (`unwrap_model`).

A model's built-in loss is already reduced over the batch, so per-sample losses are recomputed
from the logits and the labels, for the tasks whose loss is unambiguous:

- sequence / image classification: `logits` [n, C] with integer `labels` [n] -> cross-entropy;
  `problem_type="multi_label_classification"` (float labels [n, C]) -> binary cross-entropy
  averaged over the labels; `problem_type="regression"` (or one output with float labels) ->
  squared error averaged over the outputs;
- causal language modelling (`*ForCausalLM`, `*LMHeadModel`): `logits` [n, T, V], `labels`
  [n, T] shifted by one (or `shift_labels` when the batch carries them), -100 ignored, mean
  over each sequence's counted tokens (0 for a sequence without one);
- token classification (`*ForTokenClassification`): as causal LM without the shift.

Anything else raises a ValueError that says what was found: per-sample losses are never guessed.
They are plain losses: label smoothing, class weights or a custom `compute_loss_func` are not
reproduced (the caller rescales to the stock loss's normalisation where that matters).
"""

from collections.abc import Mapping

import torch
import torch.nn.functional as F

LABEL_KEYS = ("labels", "label", "label_ids")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def unwrap_model(model, peft: bool = True):
    """The innermost model: through DDP/accelerate wrappers (`.module`) and, with peft=True, PEFT
    (`get_base_model()`)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if peft and hasattr(model, "get_base_model"):
            try:
                model = model.get_base_model()
                continue
            except Exception:  # noqa: BLE001 - a PEFT model without a base model: keep it
                pass
        inner = getattr(model, "module", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
    return model


def model_logits(outputs, user: str = "a per-sample loss") -> torch.Tensor:
    """The logits in what a model returned: a dict / ModelOutput entry, a `.logits` attribute, or the
    HF tuple convention ((loss, logits, ...) when labels were given, else (logits, ...)).

    user: who needs them, for the error raised when there are none.
    """
    if isinstance(outputs, Mapping) or hasattr(outputs, "keys"):
        if "logits" in outputs:
            return outputs["logits"]
    elif hasattr(outputs, "logits"):
        return outputs.logits
    elif isinstance(outputs, (tuple, list)) and outputs:
        # HF tuple convention: (loss, logits, ...) when labels were given, else (logits, ...)
        first = outputs[0]
        if torch.is_tensor(first) and first.dim() == 0 and len(outputs) > 1:
            return outputs[1]
        return first
    raise ValueError(f"{user} needs the model's logits, but its output ({type(outputs).__name__}) "
                     "has no 'logits'.")


def _labels(inputs):
    for key in LABEL_KEYS:
        if key in inputs and inputs[key] is not None:
            return inputs[key]
    raise ValueError(f"per-sample losses need labels in the batch (one of {', '.join(LABEL_KEYS)}); "
                     f"the batch has {', '.join(map(str, inputs.keys())) or 'no keys'}.")


def _config(model):
    return getattr(model, "config", None)


def _sequence_mean(token_losses, valid):
    counts = valid.sum(dim=1)
    return (token_losses * valid).sum(dim=1) / counts.clamp(min=1)


def per_sample_loss(outputs, inputs, model) -> torch.Tensor:
    """One loss per sample of the batch, in fp32, differentiable w.r.t. the logits: shape [n].

    outputs: what the model returned (dict, ModelOutput or tuple); inputs: the batch the model saw
    (with its labels); model: the model (possibly wrapped) - its class and config tell the task.
    """
    logits = model_logits(outputs)
    labels = _labels(inputs)
    base = unwrap_model(model)
    cls = type(base).__name__
    config = _config(base)
    problem = getattr(config, "problem_type", None) if config is not None else None
    logits = logits.float()

    if logits.dim() == 3 and labels.dim() == 2:
        shift = inputs.get("shift_labels") if isinstance(inputs, Mapping) else None
        if shift is not None or cls.endswith(_CAUSAL_SUFFIXES):
            if shift is not None:
                target, scores = shift, logits
            else:
                target, scores = labels[:, 1:], logits[:, :-1]
            valid = target != -100
            token = F.cross_entropy(scores.reshape(-1, scores.size(-1)), target.reshape(-1).clamp(min=0),
                                    reduction="none").view(target.shape)
            return _sequence_mean(token, valid)
        if cls.endswith("ForTokenClassification"):
            valid = labels != -100
            token = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1).clamp(min=0),
                                    reduction="none").view(labels.shape)
            return _sequence_mean(token, valid)
        raise ValueError(f"cannot compute per-sample losses for {cls}: logits {tuple(logits.shape)} with labels "
                         f"{tuple(labels.shape)} could be a causal LM (shifted labels) or a token classifier, and "
                         "the model class says neither (*ForCausalLM / *LMHeadModel / *ForTokenClassification).")

    if logits.dim() == 2 and logits.size(0) == labels.size(0):
        n = logits.size(0)
        if problem == "multi_label_classification" or (labels.dim() == 2 and labels.shape == logits.shape
                                                         and labels.is_floating_point()):
            return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(dim=1)
        if problem == "regression" or (labels.is_floating_point() and logits.size(1) == 1):
            return F.mse_loss(logits.view(n, -1), labels.float().view(n, -1), reduction="none").mean(dim=1)
        if labels.dim() == 1 and not labels.is_floating_point():
            return F.cross_entropy(logits, labels, reduction="none")

    raise ValueError(f"cannot compute per-sample losses for {cls}: logits of shape {tuple(logits.shape)} with labels "
                     f"of shape {tuple(labels.shape)} ({labels.dtype}) match no supported task (sequence or image "
                     "classification: logits [n, C] and integer labels [n]; multi-label or regression via "
                     "config.problem_type; causal LM: logits [n, T, V] and labels [n, T]).")


def batch_size(inputs) -> int:
    """The number of samples in a batch: the first dimension of its labels (or of its first tensor)."""
    for key in LABEL_KEYS:
        if key in inputs and torch.is_tensor(inputs[key]) and inputs[key].dim() > 0:
            return inputs[key].size(0)
    for value in inputs.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return value.size(0)
    raise ValueError("cannot tell the batch size: the batch holds no tensor with a batch dimension.")


def select_samples(inputs, index):
    """The sub-batch with the samples `index` (an index tensor or list): every tensor whose first
    dimension is the batch size is indexed along it; anything else is kept as it is."""
    n = batch_size(inputs)
    if not torch.is_tensor(index):
        index = torch.as_tensor(index, dtype=torch.long)
    out = {}
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.size(0) == n:
            out[key] = value.index_select(0, index.to(value.device))
        else:
            out[key] = value
    return out
