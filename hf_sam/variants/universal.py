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
`hf_sam.variants.common.noise_seed(seed, global_step, micro_step, process_index)` and is drawn parameter by parameter
in the order of `model.named_parameters()`, so runs are reproducible and resume exactly.

Cost: 1 + n sequential passes per micro-batch; buffers g0, sum G_i (and sum L_i G_i for frobsam),
the noise, and the snapshot of w.
"""

import torch

from .. import ops
from .common import Noise, named_order, place, random_perturbation, refuse_ascent_shaping
from .registry import Facts, register

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

def loss_recorder(box: list):
    """A loss_hook that appends each pass's loss (as compute_loss returns it, detached, fp32) to box."""

    def hook(compute, model, inputs, num_items_in_batch):
        loss, outputs = compute(inputs)
        box.append(loss.detach().float())
        return loss, outputs

    return hook


def perturbation(ctx, draw, rho, unit_sphere=False):
    """rho * s, s = draw(p) for the perturbed parameters (common.random_perturbation);
    unit_sphere: s / ||s|| (one global norm). Aligned with ctx.params."""
    out = random_perturbation(ctx, draw)
    s = [out[i] for i in named_order(ctx) if out[i] is not None]
    if unit_sphere and s:
        torch._foreach_div_(s, ops.global_norm(s))
    if s:
        torch._foreach_mul_(s, rho)
    return out


def _clean_pass(ctx):
    """The pass at w: g0 (aligned with ctx.params), the indices with a gradient, the list of losses
    (L0 first) and the hook that appends each later pass's loss to it."""
    losses = []
    record = loss_recorder(losses)
    g0 = ctx.grad(loss_hook=record)
    return g0, [i for i, g in enumerate(g0) if g is not None], losses, record


def _dense(grads, g0, idx):
    """The gradients at idx, zeros where a pass produced none."""
    return [grads[i] if grads[i] is not None else torch.zeros_like(g0[i]) for i in idx]


def _descend(ctx, g0, idx, d):
    ctx.set_final(place(idx, [x.to(g0[i].dtype) for i, x in zip(idx, d)], len(ctx.params)))


def frobsam(ctx):
    cfg = ctx.config
    n, lam, rho = cfg.universal_samples, float(cfg.universal_lambda), float(cfg.rho)
    noise = Noise(ctx)
    g0, idx, losses, record = _clean_pass(ctx)                              # L0, g0 at w
    g0s = [g0[i] for i in idx]
    gsum = [torch.zeros_like(g) for g in g0s]                               # sum_i G_i
    cross = [torch.zeros_like(g) for g in g0s]                              # sum_i L_i G_i
    loss_sum = torch.zeros((), dtype=torch.float32, device=losses[0].device)
    for _ in range(n):
        s = perturbation(ctx, noise.normal, rho)                            # rho s_i, s_i ~ N(0, I)
        gi = _dense(ctx.grad(at=s, loss_hook=record), g0, idx)              # G_i, L_i at w + rho s_i
        torch._foreach_add_(cross, torch._foreach_mul(gi, losses[-1]))
        torch._foreach_add_(gsum, gi)
        loss_sum = loss_sum + losses[-1]
    # d = g0 + lam/rho^2 * (cross/(n-1) - loss_sum/(n-1) * gsum/n)
    torch._foreach_mul_(gsum, loss_sum / n)
    torch._foreach_sub_(cross, gsum)
    torch._foreach_mul_(cross, lam / (rho ** 2) / (n - 1))
    _descend(ctx, g0, idx, torch._foreach_add(g0s, cross))


def _weighted_differences(ctx, draw, psi, unit_sphere=False):
    """Shared by Det-SAM and Trace-SAM: x_i = (L_i - L0) / rho^2 for n samples rho s_i, s_i = draw(p).

    Returns g0 (aligned), idx (parameters with a clean gradient), (1/n) sum_i psi(x_i) and
    sum_i psi'(x_i) / n * (G_i - g0) (at idx), where psi(x) -> (psi(x), psi'(x)).
    """
    cfg = ctx.config
    n, rho = cfg.universal_samples, float(cfg.rho)
    noise = Noise(ctx)
    g0, idx, losses, record = _clean_pass(ctx)                              # L0, g0 at w
    g0s = [g0[i] for i in idx]
    total = [torch.zeros_like(g) for g in g0s]
    mean_psi = torch.zeros((), dtype=torch.float32, device=losses[0].device)
    for _ in range(n):
        s = perturbation(ctx, draw(noise), rho, unit_sphere)
        gi = _dense(ctx.grad(at=s, loss_hook=record), g0, idx)              # G_i, L_i at w + rho s_i
        value, slope = psi((losses[-1] - losses[0]) / (rho ** 2))
        mean_psi = mean_psi + value / n
        diff = torch._foreach_sub(gi, g0s)
        torch._foreach_mul_(diff, slope / n)
        torch._foreach_add_(total, diff)
    return g0, idx, mean_psi, total


def detsam(ctx):
    cfg = ctx.config
    h, lam = float(cfg.detsam_half_cube), float(cfg.universal_lambda)

    def psi(x):                                                             # psi(x) = exp(-x/2)
        value = torch.exp(-x / 2.0)
        return value, -0.5 * value

    g0, idx, mean_psi, total = _weighted_differences(ctx, lambda noise: lambda p: noise.uniform(p, -h, h), psi)
    torch._foreach_mul_(total, lam * (-2.0 / mean_psi ** 3))               # lambda phi'(mean psi), phi'(y) = -2/y^3
    _descend(ctx, g0, idx, torch._foreach_add([g0[i] for i in idx], total))


def tracesam(ctx):
    lam = float(ctx.config.universal_lambda)
    g0, idx, _, total = _weighted_differences(ctx, lambda noise: noise.normal, lambda x: (x, torch.ones_like(x)),
                                              unit_sphere=True)            # s_i on the unit sphere, psi = id
    torch._foreach_mul_(total, lam)                                         # phi' = 1
    _descend(ctx, g0, idx, torch._foreach_add([g0[i] for i in idx], total))


def _check(kind):
    def check(config):
        n = config.universal_samples
        if kind == "frobsam" and n is not None and n < 2:
            raise ValueError(f"universal_samples={n} is out of range for variant 'frobsam'; allowed: an integer >= 2 "
                             "(Frob-SAM estimates a covariance from the samples).")
        refuse_ascent_shaping(config, "its perturbations are random")
    return check


FROBSAM_FACTS = Facts(
    paper="Tahmasebi et al., *A Universal Class of Sharpness-Aware Minimization Algorithms*, ICML 2024, "
          "[2406.03682](https://arxiv.org/abs/2406.03682)",
    settings="`rho`, `universal_samples` (2, must be >= 2), `universal_lambda` (0.005)",
    passes="1 + n (3)",
    memory="4 (g0, Σ L_i G_i, Σ G_i, snapshot) + the noise",
)

DETSAM_FACTS = Facts(
    paper="same",
    settings="`rho`, `universal_samples` (1), `universal_lambda` (1.0), `detsam_half_cube` (0.01)",
    passes="1 + n (2)",
    memory="3 (g0, Σ, snapshot) + the noise",
)

TRACESAM_FACTS = Facts(
    paper="same",
    settings="`rho`, `universal_samples` (1), `universal_lambda` (1.0)",
    passes="1 + n (2)",
    memory="3 + the noise",
)


# The loss of every pass is read through a loss hook, which only the Trainer front-end runs.
register("frobsam", trainer_only=True, passes=3, paper=UNIVERSAL_PAPER, check=_check("frobsam"),
         facts=FROBSAM_FACTS)(frobsam)
register("detsam", trainer_only=True, passes=2, paper=UNIVERSAL_PAPER, check=_check("detsam"),
         facts=DETSAM_FACTS)(detsam)
register("tracesam", trainer_only=True, passes=2, paper=UNIVERSAL_PAPER, check=_check("tracesam"),
         facts=TRACESAM_FACTS)(tracesam)
