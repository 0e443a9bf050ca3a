"""SAM settings: one dataclass is the single source of truth.

`SAMConfig` declares every setting once (name, default, help text, allowed values, which variant
uses it, per-variant defaults). `with_sam_args(ArgsClass)` generates `sam_<name>` fields from it on
any `TrainingArguments` subclass (`SAMTrainingArguments` for the stock one), so `HfArgumentParser`,
YAML and JSON configs see the same names, defaults and help; validation runs in one place,
`SAMConfig.validate`, when a config or the arguments are built. `settings_markdown()` renders the
README's settings table.
"""

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

PERTURB_MODES = ("trainable", "lora", "norm")
RHO_SCALINGS = ("none", "mupp")
MUPP_ROLES = ("input", "hidden", "output", "fixed")
MUPP_CONVENTIONS = ("auto", "a0", "mup")
MUPP_DENOMINATORS = ("decoupled", "joint")


def setting(default, help, *, choices=None, check=None, allowed=None, used_by=None, when=None,
            variant_defaults=None):
    """A SAMConfig field with the metadata validation and the argument parser read.

    choices: allowed values (strings); check: predicate on a non-None value, `allowed` says in words
    what it accepts; used_by: variant names that read this setting (others must leave the default);
    when: (other_field, values) - the setting only has an effect when other_field is in values;
    variant_defaults: {variant: value} - with default None, the value a variant uses when the setting
    is not given (SAMConfig fills it in on construction; the help lists them).
    """
    if variant_defaults is not None:
        listed = ", ".join(f"{v} for {k}" for k, v in variant_defaults.items())
        help = f"{help} Default: {listed}."
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
        meta["help"] = f"{help} One of: {', '.join(choices)}."
    if check is not None:
        meta["check"], meta["allowed"] = check, allowed
    if used_by is not None:
        meta["used_by"] = tuple(used_by)
    if when is not None:
        meta["when"] = when
    if variant_defaults is not None:
        meta["variant_defaults"] = dict(variant_defaults)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _integer(minimum):
    """Check for an integer setting (bool excluded) of at least `minimum`."""
    return lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= minimum


def _nonneg(x):
    return math.isfinite(x) and x >= 0


def _positive(x):
    return math.isfinite(x) and x > 0


def _unit(x):
    return math.isfinite(x) and 0.0 <= x <= 1.0


def _below_one(x):
    return math.isfinite(x) and 0.0 <= x < 1.0


def _above_zero_unit(x):
    return math.isfinite(x) and 0.0 < x <= 1.0


@dataclass
class SAMConfig:
    """Settings of a sharpness-aware training run. See the README's settings table.

    Built and validated on construction: bad values raise ValueError naming the setting and what it
    allows; a setting of another variant (`used_by`) or of an inactive mode (`when`) is an error;
    numbers and booleans given as text are converted
    (`coerce_value`); settings with `variant_defaults` left at None take the
    variant's value (`resolved` names them; `replace` fills them in again for a new variant).
    """

    # --- core -----------------------------------------------------------------------------
    variant: str = setting("sam", "Algorithm name from the hf_sam.variants registry (e.g. sam, asam).")
    rho: float = setting(0.05, "Perturbation radius rho. 0 turns SAM off (stock Trainer step) for every variant; "
                         "variants without a radius (rwp, saf, mesa) refuse other values.",
                         check=_nonneg, allowed="a finite number >= 0")
    adaptive: bool = setting(False, "Adaptive (ASAM) ascent: scale each weight tensor's gradient by |w| + eta.")
    eta: float = setting(0.01, "ASAM's eta: T = |w| + eta for tensors whose name ends in 'weight'.",
                         check=_nonneg, allowed="a finite number >= 0")
    eps: float = setting(1e-12, "Added to the fp32 global gradient norm in the ascent denominator.",
                         check=_nonneg, allowed="a finite number >= 0")
    interval: int = setting(1, "Run the sharpness-aware step on every k-th optimizer step, a plain step otherwise.",
                            check=_integer(1), allowed="an integer >= 1")
    start: float = setting(0.0, "Fraction of training at which the sharpness-aware steps begin (late-phase SAM).",
                           check=_unit, allowed="a number in [0, 1]")
    end: float = setting(1.0, "Fraction of training at which the sharpness-aware steps end.",
                         check=_unit, allowed="a number in [0, 1]")
    same_dropout: bool = setting(True, "Replay the clean pass's RNG state (dropout masks) in the perturbed pass.")
    sync_ascent: bool | None = setting(None, "True: global ascent (the ascent gradient is the mean over all "
                                       "processes). False: per-device ascent without communication, as in the SAM "
                                       "paper. None (auto): per-device under DDP, global under FSDP (memory). "
                                       "'node' (HSDP only): the mean over the shard group (one node).",
                                       check=lambda x: isinstance(x, bool) or x == "node", allowed="True, False, None or 'node'")
    # --- which parameters are perturbed ---------------------------------------------------
    perturb: str = setting("trainable", "Which parameters are perturbed: every trainable parameter, the PEFT "
                           "adapter factors only, or normalisation-layer parameters only (SAM-ON).",
                           choices=PERTURB_MODES)
    perturb_include: list[str] | None = setting(None, "Regular expressions on parameter names; after the mode, "
                                                "keep only parameters matching one of them.")
    perturb_exclude: list[str] | None = setting(None, "Regular expressions on parameter names; after the mode, "
                                                "drop parameters matching one of them.")
    lora_modules_to_save: bool = setting(False, "With perturb=lora, also perturb PEFT modules_to_save copies "
                                         "(e.g. a new classifier head).", when=("perturb", ("lora",)))
    # --- per-layer rho scaling ------------------------------------------------------------
    rho_scaling: str = setting("none", "Per-layer perturbation scaling: none, or mupp (muP^2, Haas et al. 2024).",
                               choices=RHO_SCALINGS)
    mupp_base_width: int | None = setting(None, "muP^2: the base width at which the rule equals plain SAM (required).",
                                          check=_integer(1), allowed="an integer >= 1",
                                          when=("rho_scaling", ("mupp",)))
    mupp_width: int | None = setting(None, "muP^2: the model width; default read from the model config "
                                     "(hidden_size, n_embd or d_model).", check=_integer(1),
                                     allowed="an integer >= 1", when=("rho_scaling", ("mupp",)))
    mupp_roles: dict[str, str] | None = setting(None, "muP^2: mapping regex -> role (input, hidden, output, fixed), "
                                                "checked before the defaults. JSON on the command line.",
                                                when=("rho_scaling", ("mupp",)))
    mupp_convention: str = setting("auto", "muP^2 readout convention: a0 (hand-written muP), mup (MuReadout), "
                                   "auto (mup when the mup package set base shapes, else a0).",
                                   choices=MUPP_CONVENTIONS, when=("rho_scaling", ("mupp",)))
    mupp_denominator: str = setting("decoupled", "muP^2 denominator: decoupled (every layer contributes O(1)) "
                                    "or joint (the paper's MLP form).", choices=MUPP_DENOMINATORS,
                                    when=("rho_scaling", ("mupp",)))
    # --- variant settings (each used only by the variants in its used_by) -------------------
    gsam_alpha: float = setting(0.4, "GSAM: descend with g_adv - alpha * g_perp, g_perp the part of the clean gradient "
                                "orthogonal to g_adv. alpha = 0 with gsam_rho_min unset is SAM.",
                                check=_nonneg, allowed="a finite number >= 0", used_by=("gsam",))
    gsam_rho_min: float | None = setting(None, "GSAM: rho at the schedule's lowest learning rate; rho_t follows the LR "
                                         "linearly from gsam_rho_min (lowest LR) to rho (peak LR). None: constant rho.",
                                         check=_nonneg, allowed="a finite number >= 0 (and <= rho)",
                                         used_by=("gsam",))
    fsam_sigma: float = setting(1.0, "F-SAM: ascend along g - sigma * m, m the EMA of past clean gradients. 0 is SAM.",
                                check=_nonneg, allowed="a finite number >= 0", used_by=("fsam",))
    fsam_lambda: float = setting(0.9, "F-SAM: EMA decay of the clean-gradient average m (per micro-batch).",
                                 check=_unit, allowed="a number in [0, 1]", used_by=("fsam",))
    looksam_k: int = setting(5, "LookSAM: run the full SAM step (and refresh g_v) on every k-th optimizer step; the "
                             "steps between cost one pass.",
                             check=_integer(1),
                             allowed="an integer >= 1", used_by=("looksam",))
    looksam_alpha: float | None = setting(None, "LookSAM: how the one-pass steps reuse the stored direction g_v. "
                                          "None: at the size SAM measured at the refresh, g + (‖g‖ / ‖g_refresh‖) "
                                          "* g_v (trains transformers with AdamW). A number: the paper's rule "
                                          "g + alpha * (‖g‖ / ‖g_v‖) * g_v (community value 0.7).",
                                          check=_nonneg, allowed="a finite number >= 0, or None (reuse at the "
                                          "measured size)", used_by=("looksam",))
    esam_beta: float = setting(0.5, "ESAM: probability that a parameter tensor is perturbed (stochastic weight "
                               "perturbation, scaled by 1/beta). 1 perturbs every tensor.",
                               check=_above_zero_unit, allowed="a number in (0, 1]",
                               used_by=("esam",))
    esam_gamma: float = setting(0.5, "ESAM: fraction of each micro-batch kept for the descent: the samples whose loss "
                                "rises most under the perturbation. 1 keeps all.",
                                check=_above_zero_unit, allowed="a number in (0, 1]",
                                used_by=("esam",))
    ssam_sparsity: float = setting(0.5, "SSAM: fraction of the coordinates that are not perturbed. 0 is SAM.",
                                   check=_below_one, allowed="a number in [0, 1)",
                                   used_by=("ssam",))
    ssam_mask: str = setting("fisher", "SSAM: how the mask is chosen: fisher (largest squared per-sample gradients, "
                             "SSAM-F) or dynamic (random start, drop by |g| and regrow at random, SSAM-D).",
                             choices=("fisher", "dynamic"), used_by=("ssam",))
    ssam_update_interval: int = setting(100, "SSAM: refresh the mask every this many optimizer steps (the official "
                                        "code refreshes every 1-5 epochs).",
                                        check=_integer(1),
                                        allowed="an integer >= 1", used_by=("ssam",))
    ssam_fisher_samples: int = setting(16, "SSAM-F: single-sample gradients summed into the Fisher score, taken "
                                       "from the micro-batch of the refresh step (at most its size).",
                                       check=_integer(1),
                                       allowed="an integer >= 1", used_by=("ssam",), when=("ssam_mask", ("fisher",)))
    ssam_drop_rate: float = setting(0.5, "SSAM-D: initial fraction of the live mask entries dropped and regrown at a "
                                    "refresh, cosine-annealed to 0 over training.", check=_unit,
                                    allowed="a number in [0, 1]", used_by=("ssam",), when=("ssam_mask", ("dynamic",)))
    crsam_gamma: float = setting(0.1, "CR-SAM: weight of the curvature term g+ + g- - 2 g0. 0 with crsam_beta = 0 is SAM.",
                                 check=_nonneg, allowed="a finite number >= 0", used_by=("crsam",))
    crsam_beta: float = setting(0.1, "CR-SAM: weight of the gradient-difference term g+ - g-.",
                                check=_nonneg, allowed="a finite number >= 0", used_by=("crsam",))
    universal_samples: int | None = setting(
        None, "Frob-/Det-/Trace-SAM: number n of random perturbations per step (1 + n passes; frobsam needs n >= 2).",
        check=_integer(1), allowed="an integer >= 1", used_by=("frobsam", "detsam", "tracesam"),
        variant_defaults={"frobsam": 2, "detsam": 1, "tracesam": 1})
    universal_lambda: float | None = setting(
        None, "Frob-/Det-/Trace-SAM: weight lambda of the sharpness term (official README values).",
        check=_nonneg, allowed="a finite number >= 0", used_by=("frobsam", "detsam", "tracesam"),
        variant_defaults={"frobsam": 0.005, "detsam": 1.0, "tracesam": 1.0})
    detsam_half_cube: float = setting(
        0.01, "Det-SAM: half side h of the cube U[-h, h]^d the samples s_i are drawn from (perturbation rho * s_i).",
        check=_positive, allowed="a finite number > 0", used_by=("detsam",))
    rsam_sigma: float = setting(
        0.01, "R-SAM: standard deviation of the Gaussian weight noise added before the ascent "
        "(0 reproduces SAM). Default unverified against the paper.",
        check=_nonneg, allowed="a finite number >= 0", used_by=("rsam",))
    rwp_alpha: float = setting(
        0.5, "RWP: weight of the noisy gradient, d = alpha * g(w + noise) + (1 - alpha) * g(w).",
        check=_unit, allowed="a number in [0, 1]", used_by=("rwp",))
    rwp_gamma: float = setting(
        0.01, "RWP: filter-wise noise scale; row r of a weight matrix gets N(0, (gamma * ||w_r||)^2).",
        check=_nonneg, allowed="a finite number >= 0", used_by=("rwp",))
    sampa_lambda: float = setting(
        0.2, "SAMPa: weight of the extrapolated gradient, d = (1 - lambda) g(x~) + lambda g(y).",
        check=_unit, allowed="a number in [0, 1]", used_by=("sampa",))
    saf_lambda: float | None = setting(
        None, "SAF/MESA: weight of the KL trajectory loss (official code values).",
        check=_nonneg, allowed="a finite number >= 0", used_by=("saf", "mesa"),
        variant_defaults={"saf": 0.16, "mesa": 0.3})
    saf_temperature: float = setting(
        5.0, "SAF/MESA: softmax temperature T of the KL term (which is scaled by T^2).",
        check=_positive, allowed="a finite number > 0", used_by=("saf", "mesa"))
    saf_start: int = setting(
        5, "SAF/MESA: the KL term is active in epochs (0-based) strictly greater than this one.",
        check=_integer(0), allowed="an integer >= 0",
        used_by=("saf", "mesa"))
    saf_lag: int = setting(
        3, "SAF: the reference logits of a sample are the ones it produced this many epochs earlier.",
        check=_integer(1), allowed="an integer >= 1",
        used_by=("saf",))
    mesa_decay: float = setting(
        0.9998, "MESA: decay of the exponential moving average of the weights (updated after every optimizer step).",
        check=_below_one, allowed="a number in [0, 1)", used_by=("mesa",))
    aesam_delta: float = setting(
        0.9, "AE-SAM: decay of the running mean and variance of the squared gradient norm (default unverified).",
        check=_below_one, allowed="a number in [0, 1)", used_by=("aesam",))
    aesam_lambda1: float = setting(
        -1.0, "AE-SAM: threshold coefficient at the end of training; c_t = (t/T) lambda1 + (1 - t/T) lambda2 "
        "(default unverified).", check=math.isfinite, allowed="a finite number", used_by=("aesam",))
    aesam_lambda2: float = setting(
        1.0, "AE-SAM: threshold coefficient at the start of training (default unverified).",
        check=math.isfinite, allowed="a finite number", used_by=("aesam",))
    wasam_swa_start: float = setting(
        0.75, "WASAM: fraction of max_steps after which the weights are averaged (the weights after optimizer "
        "step s are averaged when s > swa_start * max_steps).", check=_unit, allowed="a number in [0, 1]",
        used_by=("wasam",))
    wasam_swa_interval: int = setting(
        0, "WASAM: average every k-th optimizer step; 0 = once per epoch, at its end (the paper).",
        check=_integer(0), allowed="an integer >= 0",
        used_by=("wasam",))
    # --- functional_sam ---------------------------------------------------------------------
    functional_sam_ascent: str = setting(
        "raw", "Functional-SAM: the ascent direction; raw (SAM's, g / ||g||) or adam (preconditioned by Adam's "
        "second moment, as psam; needs Adam/AdamW).", choices=("raw", "adam"), used_by=("functional_sam",))
    # --- wsam, bsam, gcsam, zsharp, flat_lora, lookbehind ----------------------------------------
    wsam_gamma: float = setting(
        0.9, "WSAM: weight of the sharpness term, loss + gamma / (1 - gamma) * (L(w + e) - L(w)); 0.5 is SAM, 0 the "
        "stock step.", check=_below_one, allowed="a number in [0, 1)", used_by=("wsam",))
    bsam_num_data: int | None = setting(
        None, "bSAM: N, the number of training examples (noise variance 1 / (N s)); default: the Trainer's "
        "len(train_dataset) (required with hf_sam.SAM).", check=_integer(1), allowed="an integer >= 1",
        used_by=("bsam",))
    bsam_prior_precision: float = setting(
        10.0, "bSAM: prior precision; the L2 regulariser is delta = prior_precision / N.", check=_nonneg,
        allowed="a finite number >= 0", used_by=("bsam",))
    bsam_beta1: float = setting(0.9, "bSAM: decay of the gradient momentum g_m.", check=_below_one,
                                allowed="a number in [0, 1)", used_by=("bsam",))
    bsam_beta2: float = setting(0.999, "bSAM: decay of the precision estimate s.", check=_below_one,
                                allowed="a number in [0, 1)", used_by=("bsam",))
    bsam_damping: float = setting(0.1, "bSAM: damping gamma added to the precision update.", check=_nonneg,
                                  allowed="a finite number >= 0", used_by=("bsam",))
    bsam_s_init: float = setting(1.0, "bSAM: initial precision s.", check=_positive, allowed="a finite number > 0",
                                 used_by=("bsam",))
    gcsam_descent: bool = setting(False, "GCSAM: also centralize the descent gradient (default: the ascent only).",
                                  used_by=("gcsam",))
    zsharp_percentile: float = setting(
        0.95, "ZSharp: per-tensor percentile Q_p of |z-score|; the ascent keeps the entries at or above it.",
        check=_unit, allowed="a number in [0, 1]", used_by=("zsharp",))
    flat_lora_ramp: str = setting(
        "cosine", "Flat-LoRA: schedule of the noise scale; cosine (1 - cos(pi t / T)) / 2, or constant.",
        choices=("cosine", "constant"), used_by=("flat_lora",))
    lookbehind_k: int = setting(5, "Lookbehind-SAM: inner ascent/descent steps per outer step.", check=_integer(1),
                                allowed="an integer >= 1", used_by=("lookbehind",))
    lookbehind_alpha: float = setting(
        0.5, "Lookbehind-SAM: slow-weight step, slow <- slow + alpha * (fast - slow) after k inner steps.",
        check=_above_zero_unit, allowed="a number in (0, 1]", used_by=("lookbehind",))

    def __post_init__(self):
        self._coerce_values()
        if isinstance(self.mupp_roles, str):
            try:
                self.mupp_roles = json.loads(self.mupp_roles)
            except json.JSONDecodeError as err:
                raise ValueError(f"mupp_roles: expected a JSON object mapping regex -> role, got {self.mupp_roles!r} "
                                 f"({err})") from None
        for name in ("perturb_include", "perturb_exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
        self._resolve_variant_defaults()
        self.validate()

    def _resolve_variant_defaults(self) -> None:
        """Settings left at None take the value the variant uses (`variant_defaults`), so that
        `config.saf_lambda` is the number the step uses. `resolved` names the settings filled in."""
        resolved = []
        for f in fields(self):
            defaults = f.metadata.get("variant_defaults")
            if defaults and getattr(self, f.name) is None and self.variant in defaults:
                setattr(self, f.name, defaults[self.variant])
                resolved.append(f.name)
        self.resolved = frozenset(resolved)

    def replace(self, **changes) -> "SAMConfig":
        """A copy with `changes`; settings filled in from the variant's defaults are filled in again for the
        new variant (dataclasses.replace would keep them as if they had been given)."""
        values = {f.name: None if f.name in self.resolved else getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SAMConfig(**values)

    def _coerce_values(self) -> None:
        """Numbers and booleans written as text (YAML, sweeps, environment variables) become numbers and
        booleans, or a clear error (`coerce_value`)."""
        for f in fields(self):
            setattr(self, f.name, coerce_value(f.name, f.type, getattr(self, f.name)))

    # ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the setting and what it allows. Runs on construction."""
        from .variants import get_variant  # local: variants import the step, which imports config

        variant = get_variant(self.variant)  # unknown names raise with the list of known ones
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None:
                continue
            if isinstance(value, float) and not math.isfinite(value) and "check" not in meta:
                raise ValueError(f"{f.name} must be finite, got {value!r}.")
            if "choices" in meta and value not in meta["choices"]:
                raise ValueError(f"{f.name}={value!r} is not allowed; choose one of {', '.join(meta['choices'])}.")
            if "check" in meta:
                try:
                    ok = bool(meta["check"](value))
                except TypeError:
                    ok = False
                if not ok:
                    raise ValueError(f"{f.name}={value!r} is out of range; allowed: {meta['allowed']}.")
            if f.name in self.resolved or value == _default(f):
                continue
            if "used_by" in meta and variant.name not in meta["used_by"]:
                users = ", ".join(repr(v) for v in meta["used_by"])
                raise ValueError(f"{f.name} is a setting of variant {users}; it has no effect with "
                                 f"variant={self.variant!r}. Set variant to one of {users} or remove {f.name}.")
            if "when" in meta:
                other, values = meta["when"]
                if getattr(self, other) not in values:
                    raise ValueError(f"{f.name} only has an effect when {other} is one of "
                                     f"{', '.join(map(repr, values))} (it is {getattr(self, other)!r}).")
        if not variant.uses_rho and self.rho not in (0, _default(_field("rho"))):
            raise ValueError(f"rho={self.rho!r} has no effect with variant={self.variant!r}, which does not use the "
                             f"radius rho ({variant.rho_note or 'see its documentation'}); leave rho at its default "
                             f"{_default(_field('rho'))}, or set rho=0 for the stock Trainer step.")
        if self.start >= self.end:
            raise ValueError(f"start={self.start} must be smaller than end={self.end} (fractions of training).")
        if self.rho_scaling == "mupp" and self.mupp_base_width is None:
            raise ValueError("rho_scaling='mupp' needs mupp_base_width: the width at which muP^2 equals plain SAM.")
        if self.mupp_roles is not None:
            if not isinstance(self.mupp_roles, dict):
                raise ValueError(f"mupp_roles must be a mapping regex -> role, got {type(self.mupp_roles).__name__}.")
            for pattern, role in self.mupp_roles.items():
                if role not in MUPP_ROLES:
                    raise ValueError(f"mupp_roles[{pattern!r}]={role!r} is not a role; choose one of "
                                     f"{', '.join(MUPP_ROLES)}.")
        variant.check(self)

    @property
    def effective_adaptive(self) -> bool:
        from .variants import get_variant

        return self.adaptive or get_variant(self.variant).adaptive


PREFIX = "sam_"


def _field(name):
    return next(f for f in fields(SAMConfig) if f.name == name)


def _default(f):
    """The declared default of a SAMConfig field."""
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _numeric_kind(annotation):
    """float or int when a field's type is float / int (optionally | None), else None."""
    text = str(annotation)
    for kind in (float, int):
        if annotation is kind or text in (kind.__name__, f"{kind.__name__} | None", f"typing.Optional[{kind.__name__}]"):
            return kind
    args = getattr(annotation, "__args__", ())
    if args and all(a in (float, type(None)) for a in args):
        return float
    if args and all(a in (int, type(None)) for a in args):
        return int
    return None


def _is_bool_type(annotation) -> bool:
    """True when a field's type is bool (optionally | None)."""
    if annotation is bool or str(annotation) in ("bool", "bool | None", "Optional[bool]", "typing.Optional[bool]"):
        return True
    args = getattr(annotation, "__args__", ())
    return bool(args) and bool in args and all(a in (bool, type(None)) for a in args)


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no")
BOOL_ALLOWED = "true, false, 1, 0, yes, no (any case), or a bool"
# boolean settings that also take named modes beside True/False (sync_ascent="node": HSDP's ascent per node)
BOOL_MODES = {"sync_ascent": ("node",)}


def coerce_value(name: str, annotation, value):
    """The one conversion of a setting's value by its declared type (SAMConfig and with_sam_args classes).

    bool fields: True/False, the ints 0/1 and the words true/false, 1/0, yes/no (any case, surrounding
    spaces ignored) give the bool; anything else is a ValueError naming the field (a non-empty string
    such as "false" would otherwise be truthy). float/int fields: text is parsed as a number; a bool is
    refused (True is not the number 1 here). None passes through (optional fields); other values are
    left to the validation.
    """
    if value is None:
        return value
    if _is_bool_type(annotation):
        if isinstance(value, bool):
            return value
        if type(value).__name__ == "bool_":  # numpy.bool_
            return bool(value)
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        word = value.strip().lower() if isinstance(value, str) else None
        if word in TRUE_WORDS + FALSE_WORDS:
            return word in TRUE_WORDS
        modes = BOOL_MODES.get(name[len(PREFIX):] if name.startswith(PREFIX) else name, ())
        if word in modes:
            return word
        also = "".join(f" or {m!r}" for m in modes)
        raise ValueError(f"{name}={value!r} is not a boolean; {name} takes {BOOL_ALLOWED}{also}.")
    kind = _numeric_kind(annotation)
    if kind is None:
        return value
    what = "a number" if kind is float else "an integer"
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise ValueError(f"{name}={value!r} is a boolean, not a number; {name} takes {what}.")
    if isinstance(value, str):
        try:
            return float(value) if kind is float else int(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} is not a number; {name} takes {what}.") from None
    return value


def _argument_fields():
    """SAMConfig's fields as `sam_<name>` TrainingArguments fields (same default, type and help)."""
    out = []
    for f in fields(SAMConfig):
        meta = {"help": f.metadata.get("help", "")}
        if "choices" in f.metadata:
            meta["choices"] = list(f.metadata["choices"])
        typ = f.type
        if f.name == "mupp_roles":  # dict fields travel as JSON strings on the command line
            typ = dict | str | None
        if f.name in BOOL_MODES:  # a boolean that also takes named modes: text on the command line
            typ = str | None  # (argparse's bool type refuses "node"); coerce_value reads the text
        if f.default is not dataclasses.MISSING:
            out.append((PREFIX + f.name, typ, field(default=f.default, metadata=meta)))
        else:
            out.append((PREFIX + f.name, typ, field(default_factory=f.default_factory, metadata=meta)))
    return out


_WITH_SAM_ARGS: dict[type, type] = {}


def _as_arguments(message: str) -> str:
    """A SAMConfig validation message with the settings named as arguments (rho=... -> sam_rho=...)."""
    names = "|".join(sorted((f.name for f in fields(SAMConfig)), key=len, reverse=True))
    message = re.sub(rf"(^|remove |Set )({names})\b", lambda m: m.group(1) + PREFIX + m.group(2), message)
    return re.sub(rf"(?<![\w])({names})(?==)", PREFIX + r"\1", message)


def publish_generated_class(cls: type, module_globals: dict) -> None:
    """Make a generated class importable from the module that made it, so its instances pickle.

    (The Trainer saves `torch.save(self.args)` in every checkpoint.) Two hosts with the same name from
    different packages get distinct names (`SAMSFTConfig`, `SAMSFTConfig_2`).
    """
    base, name, n = cls.__name__, cls.__name__, 1
    while module_globals.get(name, cls) is not cls:
        n += 1
        name = f"{base}_{n}"
    cls.__name__ = cls.__qualname__ = name
    cls.__module__ = module_globals["__name__"]
    module_globals[name] = cls


def with_sam_args(args_class: type) -> type:
    """`args_class` (a TrainingArguments subclass) plus every SAMConfig setting as `sam_<name>`.

    The fields are generated from SAMConfig (same defaults, types, help and choices), so
    HfArgumentParser, YAML/JSON files and TRL's parser see `--sam_rho 0.1 --sam_variant gsam`;
    the settings are validated when the arguments are built. `args.sam_config` is the SAMConfig.
    Examples: `with_sam_args(SFTConfig)`, `with_sam_args(Seq2SeqTrainingArguments)`.
    """
    if not (isinstance(args_class, type) and issubclass(args_class, TrainingArguments)):
        raise TypeError(f"with_sam_args expects a transformers.TrainingArguments subclass, got {args_class!r}")
    if all(hasattr(args_class, PREFIX + f.name) for f in fields(SAMConfig)):
        return args_class
    if args_class not in _WITH_SAM_ARGS:
        name = "SAMTrainingArguments" if args_class is TrainingArguments else f"SAM{args_class.__name__}"

        def __post_init__(self):
            for f in fields(self):  # every numeric and boolean field, the host's too: YAML reads `1e-3` as text
                setattr(self, f.name, coerce_value(f.name, f.type, getattr(self, f.name)))
            super(cls, self).__post_init__()
            try:
                config = config_from_arguments(self)  # validates before any training starts
            except ValueError as err:  # name the argument as the user wrote it: sam_rho, not rho
                raise ValueError(_as_arguments(str(err))) from None
            for f in fields(SAMConfig):  # numbers read from text files become numbers
                if f.name not in config.resolved:  # (a filled-in variant default stays None here)
                    setattr(self, PREFIX + f.name, getattr(config, f.name))

        def sam_config(self) -> SAMConfig:
            return config_from_arguments(self)

        namespace = {"__post_init__": __post_init__, "sam_config": property(sam_config, doc="The validated SAMConfig."),
                     "__doc__": f"`{args_class.__name__}` plus every `SAMConfig` setting as `sam_<name>` "
                                "(e.g. `--sam_rho 0.1`); see hf_sam.with_sam_args."}
        cls = dataclasses.make_dataclass(name, _argument_fields(), bases=(args_class,), namespace=namespace)
        publish_generated_class(cls, globals())
        _WITH_SAM_ARGS[args_class] = cls
    return _WITH_SAM_ARGS[args_class]


SAMTrainingArguments = with_sam_args(TrainingArguments)


def _expected_args_classes(host: type) -> list[type]:
    """The TrainingArguments classes named in the annotation of `host.__init__`'s `args` (most derived first)."""
    import inspect
    import sys
    import typing

    try:
        annotation = inspect.signature(host.__init__).parameters["args"].annotation
    except (KeyError, TypeError, ValueError):
        return []
    found, todo = [], [annotation]
    while todo:
        a = todo.pop()
        if isinstance(a, (str, typing.ForwardRef)):  # "TrainingArguments": look it up in the host's module
            name = a if isinstance(a, str) else a.__forward_arg__
            a = vars(sys.modules.get(host.__module__, object)).get(name.strip("'\""))
        if isinstance(a, type) and issubclass(a, TrainingArguments):
            found.append(a)
        else:
            todo.extend(typing.get_args(a))
    return [c for c in found if not any(o is not c and issubclass(o, c) for o in found)]


def check_host_arguments(trainer_class: type, args: tuple, kwargs: dict) -> None:
    """Before a SAM trainer's host builds itself: refuse sam_* arguments of the wrong class, clearly.

    A host whose __init__ expects its own arguments class (TRL's SFTTrainer: SFTConfig) converts other
    arguments with `HostConfig(**args.to_dict())`, which fails deep inside the host with "unexpected keyword
    argument 'sam_variant'" (or would silently drop the SAM settings). The arguments must then be an instance of
    `with_sam_args(HostConfig)`. The host is the first class in the MRO, outside hf_sam, that defines __init__.
    """
    import inspect

    host = next((c for c in trainer_class.__mro__ if "__init__" in vars(c) and
                 not c.__module__.startswith("hf_sam")), None)
    if host is None:
        return
    try:
        bound = inspect.signature(host.__init__).bind_partial(None, *args, **kwargs).arguments
    except TypeError:  # the host will report its own signature error
        return
    given = bound.get("args")
    if given is None or not any(hasattr(given, PREFIX + f.name) for f in fields(SAMConfig)):
        return
    expected = _expected_args_classes(host)
    if expected and not isinstance(given, tuple(expected)):
        want = expected[0]
        raise TypeError(f"{host.__name__} expects its arguments as {want.__name__}, but got {type(given).__name__} "
                        f"(SAM settings on {type(given).__mro__[1].__name__}); {host.__name__} would rebuild them "
                        f"as {want.__name__} and fail on the sam_* fields. Build the arguments with "
                        f"hf_sam.with_sam_args({want.__name__})(...) instead, e.g. "
                        f"SAM{want.__name__} = with_sam_args({want.__module__.split('.')[0]}.{want.__name__}).")


# ---- secrets: never written down (model cards, training_args.bin) ------------------------------------------
SECRET_WORDS = frozenset({"token", "key", "secret", "password", "passwd", "apikey", "credential", "credentials",
                          "auth"})
# "token" as a vocabulary item (pad_token, eos_token_id, max_token_length) is not a secret
_VOCAB_WORDS = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "chat", "image", "audio",
                          "video", "start", "end", "stop", "decoder"})
_COUNT_WORDS = frozenset({"id", "ids", "length", "len", "size", "count", "num", "type", "types", "dim", "budget"})


def is_secret_name(name: str) -> bool:
    """Whether an argument or setting named `name` holds a secret (hub_token, api_key, wandb_secret, password).

    The name is split into words at `_`, `-`, `.` and case changes; it is secret when a word is token, key,
    secret, password, passwd, apikey, credential(s) or auth, except a vocabulary token (`pad_token`,
    `eos_token_id`) or a count or id (`max_token_length`, `key_dim`).
    """
    words = [w.lower() for w in re.split(r"[_\-.\s]+|(?<=[a-z])(?=[A-Z])", name.strip("-")) if w]
    if not SECRET_WORDS.intersection(words):
        return False
    if words[-1] in _COUNT_WORDS:
        return False
    if "token" in words and SECRET_WORDS.intersection(words) == {"token"} and _VOCAB_WORDS.intersection(words):
        return False
    return True


class Secret(str):
    """A string that is itself everywhere (HTTP headers, comparisons) except when pickled: `torch.save(args)`
    (training_args.bin) stores None in its place. copy/deepcopy keep the value (hyperparameter search)."""

    def __reduce_ex__(self, protocol):
        return (type(None), ())

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        return "'<redacted>'"


def protect_secrets(args) -> None:
    """Wrap the secret-named string fields of `args` (hub_token, ...) in `Secret`, in place: the Trainer keeps
    using the values (push_to_hub), but the training_args.bin it saves and uploads holds None instead."""
    if not dataclasses.is_dataclass(args):
        return
    for f in fields(args):
        value = getattr(args, f.name, None)
        if isinstance(value, str) and not isinstance(value, Secret) and value and is_secret_name(f.name):
            setattr(args, f.name, Secret(value))


def config_from_arguments(args) -> SAMConfig:
    """SAMConfig from any object that has `sam_<name>` attributes (missing ones keep their default)."""
    values = {f.name: getattr(args, PREFIX + f.name) for f in fields(SAMConfig) if hasattr(args, PREFIX + f.name)}
    return SAMConfig(**values)


def sam_arguments_changed(args) -> dict[str, Any]:
    """The `sam_<name>` attributes of `args` whose values differ from SAMConfig's defaults."""
    out = {}
    for f in fields(SAMConfig):
        if not hasattr(args, PREFIX + f.name):
            continue
        value = getattr(args, PREFIX + f.name)
        if value != _default(f):
            out[f.name] = value
    return out


def settings_markdown() -> str:
    """The README's settings table, generated from SAMConfig (tests/test_readme.py keeps them in sync)."""
    rows = ["| argument | default | meaning |", "|---|---|---|"]
    for f in fields(SAMConfig):
        defaults = f.metadata.get("variant_defaults")
        if defaults:
            default = ", ".join(f"`{v}` ({k})" for k, v in defaults.items())
        else:
            default = f"`{_default(f)}`"
        rows.append(f"| `--{PREFIX}{f.name}` | {default} | {f.metadata.get('help', '')} |")
    return "\n".join(rows)

