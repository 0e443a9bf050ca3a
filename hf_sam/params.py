"""Which parameters are perturbed.

Contract used by the trainer (keep the signature):
    select_parameters(model, named_params, config) -> list[str]
model: the unwrapped model (PreTrainedModel, PeftModel or nn.Module);
named_params: [(name, parameter)] the optimizer updates (trainable, unique);
returns the names of the parameters to perturb, in the order of named_params.
Raises ValueError (naming the mode and the model) when nothing is left to perturb.

Modes (`SAMConfig.perturb`):
- "trainable": every parameter the optimizer updates.
- "lora": the adapter parameters of the active PEFT adapters (lora_A/lora_B, lora_embedding_A/B,
  DoRA's lora_magnitude_vector, AdaLoRA's lora_E, and the adapter tensors of any other PEFT tuner),
  found through PEFT's own bookkeeping (`BaseTunerLayer.adapter_layer_names` x `active_adapters`).
  `modules_to_save` copies (e.g. a new classifier head) are trained but only perturbed when
  `lora_modules_to_save=True`: a freshly initialised head would otherwise dominate the SAM norm.
- "norm": parameters of normalisation modules (SAM-ON), recognised by module type.
`perturb_include` / `perturb_exclude` (regular expressions, `re.search` on the names) then filter
the mode's selection.

Parameters are matched by identity, so the names in `named_params` may carry any prefix.
"""

import operator
import re

from torch import nn

# Used only when PEFT is not importable: adapter tensors recognised by name.
_LORA_NAME_FALLBACK = re.compile(r"(^|\.)lora_(A|B|E|embedding_A|embedding_B|magnitude_vector)(\.|$)")
_MODULES_TO_SAVE_FALLBACK = re.compile(r"(^|\.)modules_to_save\.")

# Normalisation modules by type; other classes are recognised by their name (LlamaRMSNorm, T5LayerNorm,
# LayerNorm2d, BatchNorm2d, ...).
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = _NORM_TYPES + (nn.RMSNorm,)
_NORM_CLASS_NAME = re.compile(r"Norm(\d+d)?$")


def select_parameters(model, named_params, config) -> list[str]:
    """Names of the parameters to perturb, in `named_params` order (see the module docstring)."""
    candidates = [(n, p) for n, p in named_params if p.requires_grad]
    if config.perturb == "trainable":
        names = [n for n, _ in candidates]
    elif config.perturb == "lora":
        chosen = lora_parameter_ids(model, config.lora_modules_to_save)
        names = [n for n, p in candidates if id(p) in chosen]
    elif config.perturb == "norm":
        chosen = norm_parameter_ids(model)
        names = [n for n, p in candidates if id(p) in chosen]
    else:
        raise ValueError(f"perturb={config.perturb!r} is not allowed; choose one of trainable, lora, norm.")
    names = filter_names(names, config.perturb_include, config.perturb_exclude)
    if not names:
        raise ValueError(_empty_selection_message(model, config, len(candidates)))
    return names


# --- patterns ---------------------------------------------------------------------------------------
def _compile(patterns, setting):
    """Compile a list of regular expressions; a bad one is an error naming the setting."""
    compiled = []
    for pattern in patterns or ():
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"{setting}: {pattern!r} is not a valid regular expression ({err}).") from None
    return compiled


def filter_names(names, include=None, exclude=None):
    """Keep names matching any `include` pattern (all when none), then drop names matching any `exclude`."""
    inc, exc = _compile(include, "perturb_include"), _compile(exclude, "perturb_exclude")
    if inc:
        names = [n for n in names if any(p.search(n) for p in inc)]
    return [n for n in names if not any(p.search(n) for p in exc)]


# --- norm ----------------------------------------------------------------------------------------------
def is_norm_module(module) -> bool:
    """True for normalisation layers: torch's norm classes, or a class whose name ends in 'Norm'.

    Covers nn.LayerNorm (GPT-2 ln_*, BERT/ViT LayerNorm), nn.RMSNorm, BatchNorm*/InstanceNorm*, GroupNorm,
    and model-specific classes such as LlamaRMSNorm, T5LayerNorm or LayerNorm2d.
    """
    return isinstance(module, _NORM_TYPES) or bool(_NORM_CLASS_NAME.search(type(module).__name__))


def norm_parameter_ids(model) -> set[int]:
    """ids of the parameters owned directly by normalisation modules of `model`."""
    return {id(p) for m in model.modules() if is_norm_module(m) for p in m.parameters(recurse=False)}


# --- lora ----------------------------------------------------------------------------------------------
def _peft_classes():
    """(BaseTunerLayer, ModulesToSaveWrapper, auxiliary wrapper classes) from PEFT, or None without PEFT."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        return None
    try:  # recent PEFT: modules_to_save and trainable-token wrappers share this base class
        from peft.utils.other import AuxiliaryTrainingWrapper
    except ImportError:
        AuxiliaryTrainingWrapper = ModulesToSaveWrapper
    return BaseTunerLayer, ModulesToSaveWrapper, AuxiliaryTrainingWrapper


def _active_adapters(module) -> list[str]:
    """The adapters a PEFT layer currently runs ([] when adapters are disabled)."""
    if getattr(module, "disable_adapters", False):
        return []
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", [])
    return [active] if isinstance(active, str) else list(active)


def _adapter_entries(module, attr_names, adapters):
    """Parameters stored under `module.<attr>[adapter]` for each attr and adapter (Module or Parameter)."""
    params = []
    for attr in attr_names:
        try:
            container = operator.attrgetter(attr)(module)  # attr may be dotted ("token_adapter.x")
        except AttributeError:
            continue
        for adapter in adapters:
            if not hasattr(container, "keys") or adapter not in container.keys():
                continue
            entry = container[adapter]
            params.extend(entry.parameters() if isinstance(entry, nn.Module) else [entry])
    return params


def _inside(name, prefixes):
    return any(name.startswith(prefix + ".") for prefix in prefixes)


def lora_parameter_ids(model, include_modules_to_save=False) -> set[int]:
    """ids of the active PEFT adapters' parameters in `model` (see the module docstring).

    Raises ValueError when the model has no active adapter, or when an active adapter is merged into
    the base weights (perturbing the adapter tensors would then not change the forward pass).
    """
    classes = _peft_classes()
    if classes is None:
        return _lora_ids_by_name(model, include_modules_to_save)
    tuner_cls, save_cls, aux_cls = classes
    chosen, merged, n_active = set(), [], 0
    wrappers = [n for n, m in model.named_modules() if isinstance(m, (save_cls, aux_cls))]
    for name, module in model.named_modules():
        if isinstance(module, save_cls):
            if include_modules_to_save:
                attrs = getattr(module, "adapter_layer_names", ("modules_to_save",))
                chosen.update(id(p) for p in _adapter_entries(module, attrs, _active_adapters(module)))
            continue
        if not isinstance(module, tuner_cls) or _inside(name, wrappers):
            continue  # layers inside auxiliary wrappers (trainable tokens, ...) are not adapter factors
        adapters = _active_adapters(module)
        n_active += bool(adapters)
        merged += [f"{name} ({a})" for a in getattr(module, "merged_adapters", []) if a in adapters]
        chosen.update(id(p) for p in _adapter_entries(module, module.adapter_layer_names, adapters))
    if n_active == 0:
        raise ValueError(f"perturb='lora' needs a PEFT model with an active adapter; {_describe(model)} has none. "
                         "Wrap the model with peft.get_peft_model(...), enable its adapter, or use "
                         "perturb='trainable'.")
    if merged:
        raise ValueError(f"perturb='lora': adapters of {_describe(model)} are merged into the base weights "
                         f"({', '.join(merged[:3])}{', ...' if len(merged) > 3 else ''}), so perturbing them would "
                         "not change the model. Unmerge them (model.unmerge_adapter()) before training.")
    return chosen


def _lora_ids_by_name(model, include_modules_to_save):
    """Fallback without PEFT: adapter tensors recognised by their names."""
    chosen = set()
    for name, p in model.named_parameters():
        if _LORA_NAME_FALLBACK.search(name) or (include_modules_to_save and _MODULES_TO_SAVE_FALLBACK.search(name)):
            chosen.add(id(p))
    if not any(_LORA_NAME_FALLBACK.search(n) for n, _ in model.named_parameters()):
        raise ValueError(f"perturb='lora' needs a PEFT model with an active adapter; {_describe(model)} has no "
                         "lora_* parameters (PEFT is not installed, so adapters are recognised by name).")
    return chosen


# --- messages ------------------------------------------------------------------------------------------
def _describe(model) -> str:
    """'PeftModelForCausalLM (wrapping GPT2LMHeadModel)' or the plain class name."""
    name = type(model).__name__
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        try:
            base = get_base()
        except Exception:  # a broken wrapper must not hide the real error
            base = None
        if base is not None and base is not model:
            return f"{name} (wrapping {type(base).__name__})"
    return name


def _empty_selection_message(model, config, n_candidates) -> str:
    patterns = ""
    if config.perturb_include or config.perturb_exclude:
        patterns = f" with perturb_include={config.perturb_include} and perturb_exclude={config.perturb_exclude}"
    hint = {
        "trainable": "Check that the model has trainable parameters and that the patterns match their names.",
        "lora": "The adapter parameters must be trainable (requires_grad) and among the optimizer's parameters.",
        "norm": "No trainable parameter belongs to a normalisation module (LayerNorm, RMSNorm, BatchNorm, GroupNorm).",
    }[config.perturb]
    return (f"perturb={config.perturb!r}{patterns} leaves no parameter of {_describe(model)} to perturb "
            f"(out of {n_candidates} trainable). {hint}")
