"""The variant registry: a name -> a step function of a StepContext, plus its metadata.

SAMConfig validation, SAMTrainer and hf_sam.SAM look variants up here (`get_variant`); every module
of hf_sam.variants registers its own on import, and users add theirs with `@register("name")`.

The registry is the one source of each variant's documented facts (`Facts`: paper, settings, passes,
memory): the README's variants table is `variants_markdown()` (tests/test_architecture.py fails when
the README is stale) and scripts/bench.py reads the memory figures from `get_variant(name).facts`.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

_REGISTRY: dict[str, "Variant"] = {}


def _no_check(config) -> None:
    return None


@dataclass(frozen=True)
class Facts:
    """What the README's variants table states of a variant (one cell each, markdown).

    paper: authors, title, venue and link ("same" repeats the row above); settings: the variant's
    settings with their defaults; passes: forward+backward passes per micro-batch on a
    sharpness-aware step, as documented (the number the FLOP count uses is `Variant.passes` and,
    per micro-batch, `ctx.passes`); memory: extra memory in parameter-sized copies beyond the stock
    Trainer's (what scripts/bench.py compares its measured peak with).
    """

    paper: str
    settings: str
    passes: str
    memory: str


@dataclass(frozen=True)
class Variant:
    """One algorithm of the SAM family.

    step: `step(ctx)` drives a StepContext (see hf_sam.step) for one micro-batch; it reads the step
        through ctx's properties (global_step, seed, optimizer, ...), which every front-end provides.
    passes: forward+backward passes per micro-batch on a sharpness-aware step, as documented (read by
        scripts/bench.py; the FLOP count uses the passes each micro-batch actually ran, `ctx.passes`).
    adaptive: the ascent is ASAM-adaptive whatever `SAMConfig.adaptive` says.
    uses_rho: the variant reads the radius rho; rho = 0 turns it into the stock Trainer step (the step
        is skipped). A variant with uses_rho=False must give the stock step itself at rho = 0 (rho = 0 is
        the stock step for every variant); any rho other than 0 and the default is refused.
    rho_note: for uses_rho=False, what sets the variant's strength instead (quoted in the refusal).
    paper: {"title", "authors", "venue", "arxiv", "bibtex"} for the model card (`<NAME>_PAPER` constants).
    check: `check(config)` raises ValueError for settings the variant cannot accept (SAMConfig.validate).
    hooks: optional context-manager factories `hook(trainer)` SAMTrainer enters around
        "evaluate" (evaluate/predict) and "save_model" (e.g. to swap in averaged weights).
    on_setup: optional `on_setup(trainer)` SAMTrainer runs once per variant when it is configured
        (check the setup, e.g. the optimizer type or dataset columns, add callbacks; raise ValueError
        before training starts).
    trainer_only: the step needs SAMTrainer: it reads `ctx.trainer`, or runs a pass with a
        `loss_hook` (only the Trainer front-end runs those). hf_sam.SAM refuses such variants, and
        those with `hooks` or `on_setup`.
    facts: its row of the README's variants table (`Facts`); None: not in the table (user variants).
    one_pass_now: optional `one_pass_now(ctx) -> bool` for a variant whose pass count changes from step to
        step (looksam): True when this micro-batch will run a single pass, so the engine skips the RNG
        snapshot that only a second pass would replay (a second pass after True is an error, not a
        silent change of dropout masks). Variants with passes=1 need not set it.
    """

    name: str
    step: Callable
    passes: float = 2
    adaptive: bool = False
    uses_rho: bool = True
    rho_note: str = ""
    paper: dict = field(default_factory=dict)
    check: Callable = _no_check
    hooks: dict = field(default_factory=dict)
    on_setup: Callable | None = None
    trainer_only: bool = False
    check_optimizer: Callable | None = None
    facts: Facts | None = None
    one_pass_now: Callable | None = None


def register(name: str, *, passes: float = 2, adaptive: bool = False, uses_rho: bool = True, rho_note: str = "",
             paper: dict | None = None, check: Callable | None = None, hooks: dict | None = None,
             on_setup: Callable | None = None, trainer_only: bool = False,
             check_optimizer: Callable | None = None, facts: Facts | None = None,
             one_pass_now: Callable | None = None, replace: bool = False):
    """Decorator: `@register("mysam")` on `def mysam(ctx): ...` makes `variant="mysam"` usable.

    The keyword arguments are the Variant fields above; replace=True overrides a registered name.
    """
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"variant name must be a non-empty identifier, got {name!r}")

    def wrap(fn):
        if name in _REGISTRY and not replace:
            raise ValueError(f"variant {name!r} is already registered; pass replace=True to override it")
        _REGISTRY[name] = Variant(name=name, step=fn, passes=passes, adaptive=adaptive, uses_rho=uses_rho,
                                  rho_note=rho_note, paper=dict(paper or {}), check=check or _no_check,
                                  hooks=dict(hooks or {}), on_setup=on_setup,
                                  trainer_only=trainer_only, check_optimizer=check_optimizer, facts=facts,
                                  one_pass_now=one_pass_now)
        return fn

    return wrap


def get_variant(name: str) -> Variant:
    """The registered variant `name`; ValueError listing the registered names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"variant={name!r} is not registered; choose one of: {', '.join(available())} "
                         "(or add your own with hf_sam.variants.register).") from None


def available() -> list[str]:
    return sorted(_REGISTRY)


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def describe(name: str, facts: Facts) -> None:
    """Give the registered variant `name` its documented facts (for a module that registers without)."""
    _REGISTRY[name] = dataclasses.replace(get_variant(name), facts=facts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe inside a markdown table cell


def variants_markdown() -> str:
    """The README's variants table: one row per variant with facts, in registration order."""
    rows = ["| variant | paper | settings (default) | passes / step | extra memory |", "|---|---|---|---|---|"]
    for v in _REGISTRY.values():
        if v.facts is not None:
            f = v.facts
            rows.append(f"| `{v.name}` | {_cell(f.paper)} | {_cell(f.settings)} | {_cell(f.passes)} | "
                        f"{_cell(f.memory)} |")
    return "\n".join(rows)
