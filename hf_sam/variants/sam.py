"""SAM and ASAM.

SAM (Foret, Kleiner, Mobahi, Neyshabur; ICLR 2021; arXiv 2010.01412):
    g = grad L_B(w);  e = rho * g / (||g|| + eps);  descend with grad L_B(w + e).
    ||.|| is one global L2 norm over the perturbed tensors, in fp32. Default rho = 0.05.

ASAM (Kwon, Kim, Park, Choi; ICML 2021; arXiv 2102.11600), the official form:
    T = |w| + eta elementwise for tensors whose name ends in "weight", T = 1 otherwise;
    e = rho * T^2 g / (||T g|| + eps). Default eta = 0.01; rho is typically ~10x SAM's (0.5 to 2).
    `variant="asam"` is `sam` with `adaptive=True`; `adaptive=True` makes any variant's ascent adaptive.

Cost: two sequential forward+backward passes per micro-batch, one parameter-sized copy of w.
"""

from .registry import Facts, register

SAM_PAPER = {
    "title": "Sharpness-Aware Minimization for Efficiently Improving Generalization",
    "authors": "Pierre Foret, Ariel Kleiner, Hossein Mobahi, Behnam Neyshabur",
    "venue": "ICLR 2021",
    "arxiv": "2010.01412",
    "bibtex": """@inproceedings{foret2021sharpnessaware,
  title={Sharpness-aware Minimization for Efficiently Improving Generalization},
  author={Pierre Foret and Ariel Kleiner and Hossein Mobahi and Behnam Neyshabur},
  booktitle={International Conference on Learning Representations},
  year={2021},
  url={https://arxiv.org/abs/2010.01412}
}""",
}

ASAM_PAPER = {
    "title": "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks",
    "authors": "Jungmin Kwon, Jeongseop Kim, Hyunseo Park, In Kwon Choi",
    "venue": "ICML 2021",
    "arxiv": "2102.11600",
    "bibtex": """@inproceedings{kwon2021asam,
  title={ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks},
  author={Kwon, Jungmin and Kim, Jeongseop and Park, Hyunseo and Choi, In Kwon},
  booktitle={Proceedings of the 38th International Conference on Machine Learning},
  pages={5905--5914},
  year={2021},
  url={https://arxiv.org/abs/2102.11600}
}""",
}


def sam(ctx):
    g = ctx.grad()                          # clean pass at w (per device, no all-reduce)
    e = ctx.ascent(g, inplace=True)         # rho * g / ||g||, selected parameters only, in g's storage
    del g
    ctx.grad(at=e, final=True, release=True)  # descent pass at w + e, accumulates into .grad


SAM_FACTS = Facts(
    paper="Foret, Kleiner, Mobahi, Neyshabur, *Sharpness-Aware Minimization for Efficiently Improving "
          "Generalization*, ICLR 2021, arXiv 2010.01412",
    settings="`rho` (0.05)",
    passes="2",
    memory="1 (snapshot of the perturbed weights)",
)

ASAM_FACTS = Facts(
    paper="Kwon, Kim, Park, Choi, *ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of "
          "Deep Neural Networks*, ICML 2021, arXiv 2102.11600",
    settings="`rho` (use ~10x SAM's, 0.5 to 2), `eta` (0.01); `adaptive=True` makes any variant's ascent adaptive",
    passes="2",
    memory="1 + transient T = |w| + eta",
)


register("sam", paper=SAM_PAPER, facts=SAM_FACTS)(sam)
register("asam", adaptive=True, paper=ASAM_PAPER, facts=ASAM_FACTS)(sam)
