"""The universal class of SAM algorithms: Frob-SAM, Det-SAM, Trace-SAM.

Tahmasebi, Soleymani, Bahri, Jegelka, Jaillet. "A Universal Class of Sharpness-Aware Minimization
Algorithms", ICML 2024, arXiv 2406.03682 (code: dbahri/universal_sam, solver/sam.py).

Zeroth order in the perturbation: n random directions s_i, L_i = L_B(w + rho s_i),
G_i = grad L_B(w + rho s_i), L0 = L_B(w), g0 = grad L_B(w). Descent direction d (written to .grad,
the base optimizer steps at w):

    frobsam:   s_i ~ N(0, I) (per coordinate, unnormalised), n >= 2
               d = g0 + lambda / rho^2 * [ 1/(n-1) sum_i L_i G_i - 1/(n-1) (sum_i L_i) (1/n) sum_i G_i ]
               (the sample covariance of L_i and G_i: a stochastic gradient of the Frobenius norm of H)
    detsam:    s_i ~ U[-h, h]^d, x_i = (L_i - L0) / rho^2, psi(x) = exp(-x/2), psi' = -psi/2,
               phi'(y) = -2 / y^3 ((2 pi)^d folded into lambda, as in the code)
               d = g0 + lambda * phi'((1/n) sum_i psi(x_i)) * sum_i psi'(x_i)/n * (G_i - g0)
    tracesam:  psi = id, phi' = 1:  d = g0 + lambda/n * sum_i (G_i - g0),
               s_i uniform on the unit sphere of the perturbed parameters (s = z / ||z||, z ~ N(0, I)).
               The official code computes this normaliser but never applies it (raw Gaussian samples); we
               follow the paper. Its README rho (0.01) was tuned with raw samples of norm ~ sqrt(d).

Defaults (official README, CIFAR-10): frobsam n = 2, lambda = 0.005 (rho = 0.005 there);
detsam n = 1, lambda = 1, h = 0.01 (rho = 1.0); tracesam n = 1, lambda = 1 (rho = 0.01). `rho` is the
shared SAMConfig setting (default 0.05): set it to the value of your recipe.

Settings: `universal_samples` (n), `universal_lambda`, `detsam_half_cube` (h). `rho = 0` (or
lambda = 0) gives the stock step. L_i are the losses `compute_loss` returns for the micro-batch (before
the gradient-accumulation division and the fp16 loss scale; the gradients carry both factors, which
the formulas above carry through linearly). Perturbations touch the selected parameters only
(`perturb`); the correction applies to every parameter with a gradient. `adaptive` and `rho_scaling`
do not apply (the directions are random).

Randomness: the noise of a micro-batch comes from a `torch.Generator` seeded with
`noise_seed(args.seed, global_step, micro_step, process_index)` and is drawn parameter by parameter
in the order of `model.named_parameters()`, so runs are reproducible and resume exactly.

Cost: 1 + n sequential passes per micro-batch; buffers g0, sum G_i (and sum L_i G_i for frobsam),
the noise, and the snapshot of w.
"""

import hashlib

import torch

from .registry import register

UNIVERSAL_PAPER = {
    "title": "A Universal Class of Sharpness-Aware Minimization Algorithms",
    "authors": "Behrooz Tahmasebi, Ashkan Soleymani, Dara Bahri, Stefanie Jegelka, Patrick Jaillet",
    "venue": "ICML 2024",
    "arxiv": "2406.03682",
    "bibtex": """@inproceedings{tahmasebi2024universal,
  title={A Universal Class of Sharpness-Aware Minimization Algorithms},
  author={Tahmasebi, Behrooz and Soleymani, Ashkan and Bahri, Dara and Jegelka, Stefanie and Jaillet, Patrick},
  booktitle={Proceedings of the 41st International Conference on Machine Learning},
  year={2024},
  url={https://arxiv.org/abs/2406.03682}
}""",
}

DEFAULT_SAMPLES = {"frobsam": 2, "detsam": 1, "tracesam": 1}
DEFAULT_LAMBDA = {"frobsam": 0.005, "detsam": 1.0, "tracesam": 1.0}


# ---- shared helpers for variants that draw random perturbations (also used by rsam, rwp) --------
def micro_step(ctx) -> int:
    """Index of this micro-batch inside its gradient-accumulation window (0-based)."""
    cached = getattr(ctx, "_hf_sam_micro", None)
    if cached is not None:
        return cached
    trainer = ctx.trainer
    step = trainer.state.global_step
    last = getattr(trainer, "_hf_sam_micro_counter", None)
    idx = last[1] + 1 if last is not None and last[0] == step else 0
    if idx >= int(getattr(trainer, "current_gradient_accumulation_steps", 1) or 1):
        idx = 0  # a new train() call that starts at the step the previous one ended on
    trainer._hf_sam_micro_counter = (step, idx)
    ctx._hf_sam_micro = idx
    return idx


def noise_seed(seed: int, step: int, micro: int, rank: int = 0) -> int:
    """Seed of the noise generator of one micro-batch: a hash of (seed, global_step, micro_step, rank)."""
    digest = hashlib.sha256(f"hf_sam:{seed}:{step}:{micro}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def named_order(ctx) -> list[int]:
    """Indices of ctx.params in the order of model.named_parameters() (the noise drawing order)."""
    sel = ctx.selection
    order = getattr(sel, "_hf_sam_named_order", None)
    if order is None:
        position = {id(p): k for k, (_, p) in enumerate(ctx.trainer.model.named_parameters())}
        order = sorted(range(len(ctx.params)), key=lambda i: position.get(id(ctx.params[i]), len(position) + i))
        sel._hf_sam_named_order = order
    return order


class Noise:
    """Per-micro-batch random numbers from generators seeded by `noise_seed` (one per device)."""

    def __init__(self, ctx):
        trainer = ctx.trainer
        self.seed = noise_seed(int(trainer.args.seed), int(trainer.state.global_step), micro_step(ctx),
                               int(trainer.accelerator.process_index))
        self._generators = {}

    def generator(self, device) -> torch.Generator:
        device = torch.device(device)
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[device] = g
        return g

    def normal(self, p: torch.Tensor) -> torch.Tensor:
        """Standard normal noise of p's shape (drawn in fp32, returned in p's dtype)."""
        z = torch.randn(p.shape, generator=self.generator(p.device), device=p.device, dtype=torch.float32)
        return z.to(p.dtype)

    def uniform(self, p: torch.Tensor, low: float, high: float) -> torch.Tensor:
        u = torch.rand(p.shape, generator=self.generator(p.device), device=p.device, dtype=torch.float32)
        return ((high - low) * u + low).to(p.dtype)


def loss_recorder(box: list):
    """A loss_hook that appends each pass's loss (as compute_loss returns it, detached, fp32) to box."""

    def hook(compute, model, inputs, num_items_in_batch):
        loss, outputs = compute(inputs)
        box.append(loss.detach().float())
        return loss, outputs

    return hook


# ---- the variants ----------------------------------------------------------------------------------
def _settings(ctx, kind):
    cfg = ctx.config
    n = cfg.universal_samples if cfg.universal_samples is not None else DEFAULT_SAMPLES[kind]
    lam = cfg.universal_lambda if cfg.universal_lambda is not None else DEFAULT_LAMBDA[kind]
    return n, float(lam), float(cfg.rho)


def _sample(ctx, kind, noise, rho):
    """One perturbation rho * s aligned with ctx.params (None where not perturbed)."""
    out = [None] * len(ctx.params)
    idx = [i for i in named_order(ctx) if ctx.selection.selected[i]]
    if kind == "detsam":
        h = float(ctx.config.detsam_half_cube)
        for i in idx:
            out[i] = noise.uniform(ctx.params[i], -h, h)
    else:
        for i in idx:
            out[i] = noise.normal(ctx.params[i])
    s = [out[i] for i in idx]
    if kind == "tracesam" and s:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(s, 2, dtype=torch.float32)))
        torch._foreach_div_(s, norm)
    if s:
        torch._foreach_mul_(s, rho)
    return out


def _universal(ctx, kind):
    n, lam, rho = _settings(ctx, kind)
    losses = []
    record = loss_recorder(losses)
    g0 = ctx.grad(loss_hook=record)  # clean pass at w
    idx = [i for i, g in enumerate(g0) if g is not None]
    noise = Noise(ctx)
    g0s = [g0[i] for i in idx]
    gsum = [torch.zeros_like(g) for g in g0s]
    if kind == "frobsam":
        cross = [torch.zeros_like(g) for g in g0s]
        loss_sum = torch.zeros((), dtype=torch.float32, device=losses[0].device)
        for _ in range(n):
            gi = ctx.grad(at=_sample(ctx, kind, noise, rho), loss_hook=record)
            li = losses[-1]
            gs = [gi[i] if gi[i] is not None else torch.zeros_like(g0[i]) for i in idx]
            torch._foreach_add_(cross, torch._foreach_mul(gs, li))
            torch._foreach_add_(gsum, gs)
            loss_sum = loss_sum + li
        # d = g0 + lam/rho^2 * (cross/(n-1) - loss_sum/(n-1) * gsum/n)
        torch._foreach_mul_(gsum, loss_sum / n)
        torch._foreach_sub_(cross, gsum)
        torch._foreach_mul_(cross, lam / (rho ** 2) / (n - 1))
        d = torch._foreach_add(g0s, cross)
    else:
        l0 = losses[0]
        cum = torch.zeros((), dtype=torch.float32, device=l0.device)
        for _ in range(n):
            gi = ctx.grad(at=_sample(ctx, kind, noise, rho), loss_hook=record)
            x = (losses[-1] - l0) / (rho ** 2)
            if kind == "detsam":
                psi = torch.exp(-x / 2.0)
                psi_p = -0.5 * psi
            else:
                psi, psi_p = x, torch.ones_like(x)
            cum = cum + psi / n
            gs = [gi[i] if gi[i] is not None else torch.zeros_like(g0[i]) for i in idx]
            diff = torch._foreach_sub(gs, g0s)
            torch._foreach_mul_(diff, psi_p / n)
            torch._foreach_add_(gsum, diff)
        phi_p = -2.0 / cum ** 3 if kind == "detsam" else torch.ones_like(cum)
        torch._foreach_mul_(gsum, lam * phi_p)
        d = torch._foreach_add(g0s, gsum)
    out = [None] * len(ctx.params)
    for i, x in zip(idx, d):
        out[i] = x.to(g0[i].dtype)
    ctx.set_final(out)


def _check(kind):
    def check(config):
        n = config.universal_samples
        if kind == "frobsam" and n is not None and n < 2:
            raise ValueError(f"universal_samples={n} is out of range for variant 'frobsam'; allowed: an integer >= 2 "
                             "(Frob-SAM estimates a covariance from the samples).")
        if config.adaptive:
            raise ValueError(f"adaptive has no effect with variant={kind!r} (its perturbations are random); "
                             "remove adaptive=True.")
        if config.rho_scaling != "none":
            raise ValueError(f"rho_scaling={config.rho_scaling!r} has no effect with variant={kind!r} "
                             "(its perturbations are random); use rho_scaling='none'.")
    return check


def frobsam(ctx):
    _universal(ctx, "frobsam")


def detsam(ctx):
    _universal(ctx, "detsam")


def tracesam(ctx):
    _universal(ctx, "tracesam")


register("frobsam", trainer_only=True, passes=3, paper=UNIVERSAL_PAPER, check=_check("frobsam"))(frobsam)
register("detsam", trainer_only=True, passes=2, paper=UNIVERSAL_PAPER, check=_check("detsam"))(detsam)
register("tracesam", trainer_only=True, passes=2, paper=UNIVERSAL_PAPER, check=_check("tracesam"))(tracesam)
