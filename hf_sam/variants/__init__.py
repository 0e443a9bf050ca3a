"""The SAM family. Each module registers its variants; users add theirs with `@register("name")`."""

from .registry import Facts, Variant, available, describe, get_variant, register, unregister, variants_markdown

from . import sam  # noqa: E402,F401  (registers sam, asam)
from . import gsam, fsam, looksam, esam, ssam, msam, crsam  # noqa: E402,F401
from . import universal, rsam, rwp, sampa, saf, mesa, psam, functional_sam, aesam, wasam  # noqa: E402,F401
from . import wsam, bsam, gcsam, zsharp, flat_lora, lookbehind  # noqa: E402,F401

# The facts (README variants table) of the variants whose modules register without them; each belongs
# in its module's register(..., facts=...) call.
LOOKSAM_FACTS = Facts(
    paper="Liu et al., *Towards Efficient and Scalable Sharpness-Aware Minimization*, CVPR 2022, arXiv 2203.02714",
    settings="`looksam_k` (5), `looksam_alpha` (0.7)",
    passes="2 every k-th step, 1 otherwise (measured 1.2 at k = 5)",
    memory="+1 persistent (g_v, in the checkpoint); +1 transient on refresh steps",
)


describe("looksam", LOOKSAM_FACTS)

__all__ = ["Facts", "Variant", "available", "describe", "get_variant", "register", "unregister", "variants_markdown"]
