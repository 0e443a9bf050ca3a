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

RSAM_FACTS = Facts(
    paper="Liu et al., *Random Sharpness-Aware Minimization*, NeurIPS 2022 "
          "([OpenReview](https://openreview.net/forum?id=htUvh7xPoa)); **equations unverified**",
    settings="`rho`, `rsam_sigma` (0.01; 0 = SAM)",
    passes="2",
    memory="2 (noise / e, snapshot)",
)

RWP_FACTS = Facts(
    paper="Li et al., *Efficient Generalization Improvement Guided by Random Weight Perturbation*, "
          "[2211.11489](https://arxiv.org/abs/2211.11489)",
    settings="`rwp_alpha` (0.5), `rwp_gamma` (0.01); no `rho`",
    passes="2 (sequential; the paper's 2-GPU parallel form is not used)",
    memory="2 (clean gradient, snapshot); the noise is freed once applied",
)

describe("looksam", LOOKSAM_FACTS)
describe("rsam", RSAM_FACTS)
describe("rwp", RWP_FACTS)

__all__ = ["Facts", "Variant", "available", "describe", "get_variant", "register", "unregister", "variants_markdown"]
