"""The SAM family. Each module registers its variants; users add theirs with `@register("name")`."""

from .registry import Facts, Variant, available, describe, get_variant, register, unregister, variants_markdown

from . import sam  # noqa: E402,F401  (registers sam, asam)
from . import gsam, fsam, looksam, esam, ssam, msam, crsam  # noqa: E402,F401
from . import universal, rsam, rwp, sampa, saf, mesa, psam, functional_sam, aesam, wasam  # noqa: E402,F401
from . import wsam, bsam, gcsam, zsharp, flat_lora, lookbehind  # noqa: E402,F401


__all__ = ["Facts", "Variant", "available", "describe", "get_variant", "register", "unregister", "variants_markdown"]
