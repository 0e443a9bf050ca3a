"""Per-parameter rho multipliers and norm weights (rho_scaling).

Contract used by the trainer (keep the signature):
    layer_factors(model, named_params, config) -> tuple[list[float], list[float]] | None
model: the unwrapped model; named_params: [(name, parameter)] of the perturbed parameters.
Returns (s, q): per-parameter numerator factor s and denominator weight q, aligned with
named_params, so that e_p = rho * s_p * g_p / (sqrt(sum_k (q_k * ||g_k||)^2) + eps);
or None when no scaling applies (rho_scaling="none": s = q = 1).

muP^2 (Haas, Xu, Cevher, Chennuru Vankadara, NeurIPS 2024, arXiv 2411.00075), in the decoupled
form with multipliers relative to a base width (m = width / mupp_base_width):

    role          s (numerator)            q (denominator weight)
    input-like    m                        sqrt(m)
    hidden        1                        1
    output-like   1/m  (a0) | m  (mup)     1/sqrt(m)  (a0) | sqrt(m)  (mup)
    fixed         1                        1

"a0" is hand-written muP (readout initialised ~1/width, no multiplier), "mup" is the mup package's
form (MuReadout divides by the width multiplier). With mupp_denominator="joint", q = s (the
paper's MLP form). At m = 1 every factor is exactly 1: plain SAM. The rule presupposes a model
trained in muP; see the README section on rho_scaling.

Roles come, in this order, from `mupp_roles` (regex on the name -> role), from `p.infshape` when the
mup package set base shapes (and the convention is "auto" or "mup"), or from defaults for
Hugging Face transformers (`parameter_roles` shows them).
"""

import math
import re
from dataclasses import dataclass

from torch import nn

from .params import _describe, is_norm_module

WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")
# Module names (last path component) of task heads whose final linear layer is the readout.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "head", "cls")
# Path components of embedding modules (word, position, patch embeddings): parameters inside are input-like.
_EMBED_COMPONENT = re.compile(r"^(wte|wpe|embed_\w+|\w*embed(ding)?s?)$")
# PEFT wrapper components that do not change what a layer is.
_PEFT_WRAPPERS = ("base_layer", "original_module")


@dataclass(frozen=True)
class ParamRole:
    """The muP^2 role of one parameter, its width multiplier, and why it was chosen."""

    name: str
    role: str  # input | hidden | output | fixed
    m: float
    reason: str
    hidden_ratio: float = 1.0  # infshape only: fan_in mult / fan_out mult of a non-square matrix


def layer_factors(model, named_params, config):
    """(s, q) per perturbed parameter for `config.rho_scaling`, or None for "none"."""
    if config.rho_scaling == "none":
        return None
    if config.rho_scaling != "mupp":
        raise ValueError(f"rho_scaling={config.rho_scaling!r} is not allowed; choose one of none, mupp.")
    convention = resolve_convention(named_params, config)
    roles = parameter_roles(model, named_params, config)
    pairs = [role_factors(r, convention, config.mupp_denominator) for r in roles]
    return [s for s, _ in pairs], [q for _, q in pairs]


def role_factors(role: ParamRole, convention: str, denominator: str = "decoupled") -> tuple[float, float]:
    """Numerator factor s and denominator weight q of one parameter (table in the module docstring)."""
    m = role.m
    if role.role == "input" or (role.role == "output" and convention == "mup"):
        s, q = m, math.sqrt(m)
    elif role.role == "output":
        s, q = 1.0 / m, 1.0 / math.sqrt(m)
    elif role.role == "hidden":
        s, q = 1.0 / role.hidden_ratio, 1.0
    elif role.role == "fixed":
        s, q = 1.0, 1.0
    else:
        raise ValueError(f"mupp role {role.role!r} of {role.name!r} is not a role; choose one of "
                         "input, hidden, output, fixed.")
    if denominator == "joint":
        q = s
    elif denominator != "decoupled":
        raise ValueError(f"mupp_denominator={denominator!r} is not allowed; choose one of decoupled, joint.")
    return float(s), float(q)


def resolve_convention(named_params, config) -> str:
    """"a0" or "mup": "auto" means "mup" when the mup package attached `infshape`, else "a0"."""
    if config.mupp_convention in ("a0", "mup"):
        return config.mupp_convention
    if config.mupp_convention != "auto":
        raise ValueError(f"mupp_convention={config.mupp_convention!r} is not allowed; choose one of auto, a0, mup.")
    return "mup" if any(hasattr(p, "infshape") for _, p in named_params) else "a0"


# --- roles ----------------------------------------------------------------------------------------------
def parameter_roles(model, named_params, config) -> list[ParamRole]:
    """The role and width multiplier of each parameter in `named_params` (in order)."""
    convention = resolve_convention(named_params, config)
    user = _compile_roles(config.mupp_roles)
    use_infshape = convention == "mup" and any(hasattr(p, "infshape") for _, p in named_params)
    readouts = _readout_class_params(model) if use_infshape else set()
    facts = None if use_infshape else _ModelFacts(model)
    m = None if use_infshape else model_width(model, config) / _base_width(config)
    roles = []
    for name, p in named_params:
        pm = _infshape_mult(p) if use_infshape else m
        matched = next(((pat, role) for pat, role in user if pat.search(name)), None)
        if matched is not None:
            roles.append(ParamRole(name, matched[1], pm, f"mupp_roles[{matched[0].pattern!r}]"))
        elif use_infshape:
            roles.append(_infshape_role(name, p, id(p) in readouts))
        else:
            role, reason = facts.default_role(name, p, convention)
            roles.append(ParamRole(name, role, m, reason))
    return roles


def _compile_roles(mapping):
    compiled = []
    for pattern, role in (mapping or {}).items():
        try:
            compiled.append((re.compile(pattern), role))
        except re.error as err:
            raise ValueError(f"mupp_roles: {pattern!r} is not a valid regular expression ({err}).") from None
        if role not in ("input", "hidden", "output", "fixed"):
            raise ValueError(f"mupp_roles[{pattern!r}]={role!r} is not a role; choose one of input, hidden, output, fixed.")
    return compiled


def _base_width(config) -> int:
    if config.mupp_base_width is None:
        raise ValueError("rho_scaling='mupp' needs mupp_base_width (sam_mupp_base_width): the width at which muP^2 "
                         "equals plain SAM, e.g. the width the hyperparameters were tuned at.")
    return int(config.mupp_base_width)


def model_width(model, config) -> int:
    """`mupp_width`, else hidden_size / n_embd / d_model from the model's config."""
    if config.mupp_width is not None:
        return int(config.mupp_width)
    model_config = getattr(model, "config", None)
    for key in WIDTH_KEYS:
        value = getattr(model_config, key, None) if model_config is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise ValueError(f"rho_scaling='mupp' needs the model width, and {_describe(model)} has no config with "
                     f"{', '.join(WIDTH_KEYS)}. Set mupp_width (sam_mupp_width) to the width of the model.")


# --- mup package route --------------------------------------------------------------------------------
def _infshape_mult(p) -> float:
    """Width multiplier of a parameter from mup's infshape (1 for a parameter without width dimensions)."""
    shape = getattr(p, "infshape", None)
    if shape is None or shape.ninf() == 0:
        return 1.0
    return float(shape.width_mult())


def _readout_class_params(model) -> set[int]:
    """ids of the parameters of mup readout layers (MuReadout, MuSharedReadout), recognised by class name."""
    return {id(p) for m in model.modules() if "Readout" in type(m).__name__ for p in m.parameters(recurse=False)}


def _infshape_role(name, p, in_readout=False) -> ParamRole:
    """Role from mup's infshape: 0 width dims -> fixed, 1 -> vector-like (input, or output in a readout), 2 -> matrix.

    Under the mup convention input-like and output-like tensors get the same factors; the readout is
    named only to make `parameter_roles` readable.
    """
    shape = getattr(p, "infshape", None)
    if shape is None:
        return ParamRole(name, "fixed", 1.0, "no infshape (mup base shapes not set for it)")
    k = shape.ninf()
    if k == 0:
        return ParamRole(name, "fixed", 1.0, "infshape: no width dimension")
    if k == 1:
        role, reason = ("output", "infshape: readout weight") if in_readout else ("input", "infshape: one width dimension")
        return ParamRole(name, role, float(shape.width_mult()), reason)
    return ParamRole(name, "hidden", float(shape.width_mult()), "infshape: matrix",
                     hidden_ratio=float(shape.fanin_fanout_mult_ratio()))


# --- default roles for Hugging Face models ---------------------------------------------------------------
def _canonical(path: str) -> str:
    """Module path without PEFT wrapper components (base_layer, original_module, modules_to_save.<adapter>)."""
    parts, out, skip = path.split(".") if path else [], [], False
    for part in parts:
        if skip:
            skip = False
        elif part == "modules_to_save":
            skip = True
        elif part not in _PEFT_WRAPPERS:
            out.append(part)
    return ".".join(out)


def _is_adapter_part(path: str) -> bool:
    """True for modules inside a PEFT LoRA adapter (lora_A, lora_B, lora_embedding_A, ...)."""
    return any(part.startswith("lora_") for part in path.split("."))


class _ModelFacts:
    """What the default roles need to know about a model: readout layers, norms, embeddings."""

    def __init__(self, model):
        self.model_name = _describe(model)
        self.output_weights, self.output_biases = set(), set()
        for head in self._heads(model):
            for layer in self._readout_layers(head):
                direct = dict(layer.named_parameters(recurse=False))
                self.output_weights.add(id(direct["weight"]))
                if "bias" in direct:
                    self.output_biases.add(id(direct["bias"]))
        self.input_reason = {}
        for path, module in model.named_modules():
            direct = list(module.parameters(recurse=False))
            if _is_adapter_part(path):
                continue  # PEFT adapter tensors keep the generic rules (matrix: hidden, vector: input)
            if is_norm_module(module):
                reason = "norm"
            elif isinstance(module, nn.Embedding):
                reason = "embedding"
            elif any(_EMBED_COMPONENT.match(c) for c in _canonical(path).split(".")):
                reason = "inside an embedding module"
            else:
                continue
            for p in direct:
                self.input_reason.setdefault(id(p), reason)

    @staticmethod
    def _heads(model):
        """Modules that end in the readout: get_output_embeddings() and task heads (lm_head, classifier, ...)."""
        heads = []
        getter = getattr(model, "get_output_embeddings", None)
        try:
            out = getter() if callable(getter) else None
        except (AttributeError, NotImplementedError):
            out = None
        if isinstance(out, nn.Module):
            heads.append(out)
        for path, module in model.named_modules():
            if _canonical(path).rsplit(".", 1)[-1] in HEAD_NAMES:
                heads.append(module)
        return heads

    @staticmethod
    def _readout_layers(head):
        """The last linear-like layer of a head (all its PEFT copies), skipping adapter factors."""
        groups = {}
        for path, module in head.named_modules():
            weight = dict(module.named_parameters(recurse=False)).get("weight")  # own, not forwarded by a wrapper
            if weight is None or weight.ndim < 2:
                continue
            if _is_adapter_part(path):
                continue
            groups.setdefault(_canonical(path), []).append(module)
        return list(groups.values())[-1] if groups else []

    def default_role(self, name, p, convention) -> tuple[str, str]:
        """(role, reason) for a parameter from module types and names (transformers conventions)."""
        pid = id(p)
        if pid in self.output_weights and pid in self.input_reason and convention == "a0":
            raise ValueError(
                f"rho_scaling='mupp': {name!r} of {self.model_name} is both the input embedding and the output "
                "layer (tied weights). Under mupp_convention='a0' the two roles need opposite factors (m and 1/m). "
                "Untie them (tie_word_embeddings=False), use mupp_convention='mup' if the model is in the mup "
                "package's form (readout multiplied by 1/m, both roles then scale by m), or give the tensor a role "
                f"yourself, e.g. mupp_roles={{{re.escape(name)!r}: 'fixed'}}.")
        if pid in self.output_weights:
            return "output", "readout layer"
        if pid in self.output_biases:
            return "fixed", "readout bias"
        if pid in self.input_reason:
            return "input", self.input_reason[pid]
        if name.rsplit(".", 1)[-1] == "bias":
            return "input", "bias"
        if p.ndim >= 2:
            return "hidden", "matrix"
        if p.ndim == 1:
            return "input", "vector"
        return "fixed", "scalar"
