"""What several variants share, written once.

- lists aligned with `ctx.params` (None = nothing for that parameter): `pick`, `place`, `perturbed`;
- the GSAM decomposition of one gradient along another (gsam, looksam): `projection`,
  `orthogonal_part`;
- seeded random numbers (esam, ssam, rsam, rwp, frobsam, detsam, tracesam): one scheme, `Noise`: a
  `torch.Generator` per micro-batch seeded with `noise_seed(seed, global_step, micro_step, rank)`, so a
  run is reproducible, a resumed run draws what an uninterrupted one draws, nothing about the
  generators is stored, and both front-ends (SAMTrainer, hf_sam.SAM) draw the same numbers;
- `named_order`: the order in which noise is drawn (model.named_parameters());
- `base_optimizer`: the torch optimizer behind wrappers (accelerate's AcceleratedOptimizer);
- the Trainer's private API, in one place (`host_loss`, `training_batches`, `keep_column`): the
  variants that need the Trainer (SSAM's Fisher passes, WASAM's BatchNorm pass, SAF's index column)
  reach its internals only through these, so a transformers change is mended here once.

Every step helper reads the step through the StepContext's properties (`ctx.seed`, `ctx.global_step`,
`ctx.process_index`, `ctx.model`, `ctx.optimizer`, `ctx.scratch`), never through the Trainer.
"""

import hashlib

import torch

from .. import ops


# ---- lists aligned with ctx.params --------------------------------------------------------------
def pick(values, idx):
    return [values[i] for i in idx]


def place(idx, values, size) -> list:
    """A list of length `size` with values[k] at position idx[k] and None elsewhere."""
    out = [None] * size
    for i, x in zip(idx, values):
        out[i] = x
    return out


def perturbed(ctx, *lists) -> list[int]:
    """Indices of the perturbed parameters for which every list has an entry."""
    sel = ctx.selection.selected
    return [i for i in range(len(ctx.params)) if sel[i] and all(x[i] is not None for x in lists)]


# ---- the GSAM decomposition ---------------------------------------------------------------------
def projection(a, b, eps) -> torch.Tensor:
    """c = (a . b) / (||b|| + eps)^2, so that c * b is the part of a along b (global, fp32, on the device)."""
    n = ops.global_norm(b) + eps
    return ops.global_dot(a, b) / (n * n)


def orthogonal_part(a, b, eps) -> list:
    """a - (a . b) / (||b|| + eps)^2 * b: the part of a orthogonal to b (new tensors)."""
    out = torch._foreach_mul(b, -projection(a, b, eps))
    torch._foreach_add_(out, a)
    return out


# ---- seeded random numbers ----------------------------------------------------------------------
MICRO = "micro_step"  # ctx.state entry: [global_step, index of the latest micro-batch of that step]


def micro_step(ctx) -> int:
    """Index of this micro-batch inside its optimizer step (0-based), counted in the variant's state."""
    cached = ctx.scratch.get(MICRO)
    if cached is not None:
        return cached
    step = ctx.global_step
    last = ctx.state.get(MICRO)
    idx = int(last[1]) + 1 if last is not None and int(last[0]) == step else 0
    ctx.state[MICRO] = [step, idx]
    ctx.scratch[MICRO] = idx
    return idx


def noise_seed(seed: int, step: int, micro: int, rank: int = 0) -> int:
    """Seed of the noise generator of one micro-batch: a hash of (seed, global_step, micro_step, rank)."""
    digest = hashlib.sha256(f"hf_sam:{seed}:{step}:{micro}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def named_order(ctx) -> list[int]:
    """Indices of ctx.params in the order of model.named_parameters() (the noise drawing order).

    Without a model (hf_sam.SAM built without model=) the order is the optimizer's.
    """
    return ctx.selection.named_order


def random_perturbation(ctx, draw) -> list:
    """draw(p) for every perturbed parameter p, drawn in `named_order`; aligned with ctx.params."""
    idx = [i for i in named_order(ctx) if ctx.selection.selected[i]]
    # sharded parameters (FSDP2): `draw` sees the full tensor (one process's numbers), the result is cut
    # to this rank's shard (ops.draw_like)
    return place(idx, [ops.draw_like(ctx.params[i], draw) for i in idx], len(ctx.params))


class Noise:
    """The random numbers of one micro-batch, from generators seeded by `noise_seed` (one per device).

    per_process=False draws the same numbers on every process (rank 0's seed). On sharded parameters
    (FSDP2's global ascent: one weight vector for all processes) every process draws rank 0's numbers.
    """

    def __init__(self, ctx, per_process: bool = True):
        one_vector = any(ops.is_sharded(p) for p in ctx.params)
        rank = ctx.process_index if per_process and not one_vector else 0
        self.seed = noise_seed(ctx.seed, ctx.global_step, micro_step(ctx), rank)
        self._generators = {}

    def generator(self, device="cpu") -> torch.Generator:
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

    def rand(self, n: int) -> torch.Tensor:
        """n uniform numbers in [0, 1) drawn on the CPU (masks and selections)."""
        return torch.rand(n, generator=self.generator("cpu"))


# ---- settings ---------------------------------------------------------------------------------------
def refuse_ascent_shaping(config, why: str) -> None:
    """ValueError for `adaptive` / `rho_scaling`, which shape a gradient ascent, with a variant that has none."""
    if config.adaptive:
        raise ValueError(f"adaptive has no effect with variant={config.variant!r} ({why}); remove adaptive=True.")
    if config.rho_scaling != "none":
        raise ValueError(f"rho_scaling={config.rho_scaling!r} has no effect with variant={config.variant!r} "
                         f"({why}); use rho_scaling='none'.")


# ---- the optimizer -------------------------------------------------------------------------------
def base_optimizer(optimizer):
    """The torch optimizer behind wrappers such as accelerate's AcceleratedOptimizer."""
    opt = optimizer
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


# ---- the Trainer's private API, in one place ---------------------------------------------------------
def host_loss(trainer, model, batch):
    """The host trainer's training loss on `batch` (inputs prepared, its loss context), forward only."""
    batch = trainer._prepare_inputs(batch)
    with trainer.compute_loss_context_manager():
        return trainer.compute_loss(model, batch)


def training_batches(trainer):
    """The training set in order, in batches of per_device_train_batch_size, columns removed as the
    Trainer removes them, inputs prepared (on the device)."""
    ds = trainer.train_dataset
    collator = trainer.data_collator
    try:
        import datasets

        if isinstance(ds, datasets.Dataset):
            ds = trainer._remove_unused_columns(ds, description="training")
        else:
            collator = trainer._get_collator_with_removed_columns(collator, description="training")
    except ImportError:
        collator = trainer._get_collator_with_removed_columns(collator, description="training")
    loader = torch.utils.data.DataLoader(ds, batch_size=trainer.args.per_device_train_batch_size,
                                         collate_fn=collator, shuffle=False)
    for batch in loader:
        yield trainer._prepare_inputs(batch)


def keep_column(trainer, name) -> bool:
    """Keep the dataset column `name` through remove_unused_columns; False when this Trainer cannot."""
    try:
        trainer._set_signature_columns_if_needed()
        if name not in trainer._signature_columns:
            trainer._signature_columns.append(name)
    except (AttributeError, TypeError):
        return False
    return True
