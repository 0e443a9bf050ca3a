"""Multi-tensor helpers for the hot path: every op here is one `torch._foreach_*` call (or a few).

Lists of tensors stand for one flat vector; norms are global L2 norms computed in fp32.

Sharded tensors (FSDP2's DTensor parameters and gradients: Shard(0) on a 1-D mesh, or
(Replicate(), Shard(0)) on HSDP's (replicate, shard) mesh) are accepted everywhere: elementwise ops
run on the local shards (`to_local()`, same storage), and a global norm or inner product is the
local shards' sum reduced by ONE scalar all-reduce over the shard group. Results of reductions are
plain 0-dim tensors holding the global value on every process. `draw_like` draws random numbers
for a DTensor as one process would draw them for the full tensor.

The collectives of the step live here too (the scalar all-reduce of sharded norms, `all_mean_`,
`mean_over_processes`), and `isolated`: a block after which the global RNG and given buffers are
as before (passes beside the step's own).
"""

from contextlib import contextmanager

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None

Tensors = list[torch.Tensor]


def is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(tensors: Tensors) -> Tensors:
    """The local shards of DTensors (views on the same storage); other tensors as they are."""
    return [t.to_local() if is_sharded(t) else t for t in tensors]


def plain(value):
    """A 0-dim metric value as a plain tensor (a replicated DTensor's local value is the global one)."""
    if is_sharded(value):
        return value.full_tensor()
    return value


def _shard_group(tensors):
    """The process group to sum over when the list holds sharded tensors (None: all local).

    A DTensor's placements may replicate it along some mesh dims (HSDP: (Replicate(), Shard(0)) on a
    (replicate, shard) mesh) and must shard it along exactly one: the sum runs over that dim's group
    only, since the replicas hold copies of the same shards (summing over all processes would count
    each shard once per replica).
    """
    for t in tensors:
        if is_sharded(t):
            dims = [i for i, pl in enumerate(t.placements) if pl.is_shard()]
            if len(dims) != 1 or any(not (pl.is_shard() or pl.is_replicate()) for pl in t.placements):
                raise NotImplementedError(f"hf_sam sums over DTensors sharded along exactly one mesh dim and "
                                          f"replicated along the others (FSDP2, HSDP); got placements "
                                          f"{t.placements} on a {t.device_mesh.ndim}-D mesh.")
            return t.device_mesh.get_group(dims[0])
    return None


def draw_like(p, draw):
    """draw(p) for a plain tensor. For a DTensor: draw(the full tensor), so the numbers are the ones a
    single process draws from the same generator, cut to this rank's shard (a DTensor like p).

    Every rank must call it for the same tensors in the same order: gathering p is one all-gather
    (the cut itself communicates nothing: `src_data_rank=None` keeps each rank's own full draw).
    """
    if not is_sharded(p):
        return draw(p)
    from torch.distributed.tensor import distribute_tensor

    full = draw(p.detach().full_tensor())
    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)


def _sum_over_shards(parts: torch.Tensor, tensors) -> torch.Tensor:
    """sum of per-tensor `parts` over all processes' shards: one scalar all-reduce when any is sharded.

    A tensor that is not sharded (replicated, e.g. a parameter FSDP does not manage) counts once.
    """
    group = _shard_group(tensors)
    if group is None:
        return parts.sum()
    if not all(is_sharded(t) for t in tensors):  # (rare) a host-built weight vector, off the all-sharded path
        world = torch.distributed.get_world_size(group)
        weights = [1.0 if is_sharded(t) else 1.0 / world for t in tensors]
        parts = parts * torch.tensor(weights, dtype=parts.dtype, device=parts.device)
    total = parts.sum()
    torch.distributed.all_reduce(total, group=group)
    return total


def reduction_dtype(tensors: Tensors) -> torch.dtype:
    """fp32 for norms and dots of low-precision (and fp32) tensors; float64 when any tensor is (never narrowed)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def global_norm(tensors: Tensors, weights: list[float] | None = None) -> torch.Tensor:
    """sqrt(sum_i (w_i * ||t_i||)^2) in fp32 (float64 for float64 tensors), as a 0-dim device tensor (no host sync).

    Sharded tensors: the squared local norms are summed and all-reduced once (one scalar).
    """
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    norms = torch.stack(torch._foreach_norm(local(tensors), 2, dtype=reduction_dtype(tensors)))
    if weights is not None:
        norms = norms * torch.tensor(weights, dtype=norms.dtype, device=norms.device)
    if _shard_group(tensors) is None:
        return torch.linalg.vector_norm(norms)
    return _sum_over_shards(norms.square(), tensors).sqrt()


def global_norms(tensors: Tensors, weightings: list) -> list[torch.Tensor]:
    """[global_norm(tensors, w) for w in weightings] from ONE per-tensor norm pass (a weighting is None or a
    list of floats): the step's gradient norm, its q-weighted norm and its s-weighted norm share one read."""
    if not tensors:
        return [torch.zeros((), dtype=torch.float32) for _ in weightings]
    if _shard_group(tensors) is not None:  # sharded: each weighting through the one sharded reduction
        return [global_norm(tensors, w) for w in weightings]
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=reduction_dtype(tensors)))
    out = []
    for w in weightings:
        weighted = norms if w is None else norms * torch.tensor(w, dtype=norms.dtype, device=norms.device)
        out.append(torch.linalg.vector_norm(weighted))
    return out


def finiteness_probe(tensors: Tensors, extra: Tensors = ()) -> torch.Tensor:
    """A 0-dim tensor that is finite exactly when every entry of `tensors` and `extra` is (NaN and +-inf give a
    non-finite value): the sum of per-tensor fp32 norms, one fused read (the non-finite guard's single check).

    `extra`: plain tensors of any shape (a loss) checked with them. Sharded `tensors`: their global norm (one scalar
    all-reduce, so every process decides alike) plus the extras'.
    """
    extra = [t.detach() for t in extra]
    if _shard_group(tensors) is not None:
        total = global_norm(tensors)
        return total + finiteness_probe(extra).to(total) if extra else total
    parts = list(tensors) + extra
    if not parts:
        return torch.zeros((), dtype=torch.float32)
    return torch.stack(torch._foreach_norm(parts, 2, dtype=reduction_dtype(parts))).sum()


def global_dot(a: Tensors, b: Tensors) -> torch.Tensor:
    """sum_i <a_i, b_i> in fp32 (float64 for float64 tensors), as a 0-dim device tensor (no host sync; sharded:
    one scalar all-reduce)."""
    if not a:
        return torch.zeros((), dtype=torch.float32)
    dtype = reduction_dtype(list(a) + list(b))
    dots = [torch.vdot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)) for x, y in zip(local(a), local(b))]
    return _sum_over_shards(torch.stack(dots), a)


def finite_or_zero(scale: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """`scale` where `norm` is finite, else 0 (a device-side select, no host sync)."""
    return torch.where(torch.isfinite(norm), scale, torch.zeros_like(scale))


def zero_nonfinite_(tensors: Tensors) -> None:
    """Replace NaN and +-inf entries by 0 in place (an overflowed ascent must never reach the weights)."""
    for t in local(tensors):
        torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)


def zero_where_(tensors: Tensors, condition: torch.Tensor) -> None:
    """t_i = 0 where the 0-dim bool `condition` is true (NaN too), else unchanged; no device sync."""
    condition = plain(condition)
    if condition.device.type == "cpu":  # reading a CPU flag syncs nothing: skip the work when it is false
        if bool(condition):
            torch._foreach_zero_(local(tensors))
        return
    for t in local(tensors):
        t.masked_fill_(condition, 0)


def batchnorms(model) -> list:
    """BatchNorm modules of `model` that keep running statistics."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


def batchnorm_buffers(modules) -> Tensors:
    """Their running-statistics buffers (mean, var, count), to snapshot and restore."""
    return [t for m in modules for t in (m.running_mean, m.running_var, m.num_batches_tracked)]


def rng_state():
    """The CPU and (initialised) CUDA generators' states, to replay a pass's random draws."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None  # initialised implies available
    return torch.get_rng_state(), cuda


def set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def scale_(tensors: Tensors, scale: torch.Tensor, factors: list[float] | None = None) -> Tensors:
    """t_i *= factors_i * scale, in place."""
    ts = local(tensors)
    if factors is not None and not torch.is_tensor(scale):  # a host scale: one multiply by factors_i * scale
        torch._foreach_mul_(ts, [f * scale for f in factors])
        return tensors
    if factors is not None:
        torch._foreach_mul_(ts, factors)
    torch._foreach_mul_(ts, plain(scale))
    return tensors


def snapshot(tensors: Tensors) -> Tensors:
    """Exact copies (one parameter-sized buffer)."""
    if not tensors:
        return []
    with torch.no_grad():  # detached copies without a detach per tensor
        if hasattr(torch, "_foreach_clone"):
            return torch._foreach_clone(list(tensors))
        return [t.clone() for t in tensors]  # older torch


def restore_(targets: Tensors, saved: Tensors) -> None:
    """Copy `saved` back into `targets` in place: bit-exact, keeps storage (DDP bucket views, compile).

    Sharded tensors are copied shard by shard (aten._foreach_copy_ has no DTensor rule).
    """
    if targets:
        with torch.no_grad():
            torch._foreach_copy_(local(targets), local(saved))


def add_(targets: Tensors, offsets: Tensors) -> None:
    if targets:
        with torch.no_grad():
            torch._foreach_add_(local(targets), local(offsets))


def adaptive_weights(params: Tensors, names: list[str], eta: float) -> list[torch.Tensor | None]:
    """ASAM's T = |w| + eta for tensors whose name ends in "weight"; None (meaning T = 1) otherwise."""
    idx = [i for i, n in enumerate(names) if n.endswith("weight")]
    out: list[torch.Tensor | None] = [None] * len(params)
    if idx:
        ts = torch._foreach_abs([params[i].detach() for i in idx])
        torch._foreach_add_(ts, eta)
        for i, t in zip(idx, ts):
            out[i] = t
    return out


def mul_where_(tensors: Tensors, factors: list[torch.Tensor | None]) -> None:
    """t_i *= f_i for the entries with a factor (ASAM's T); in place."""
    pairs = [(t, f) for t, f in zip(tensors, factors) if f is not None]
    if pairs:
        ts, fs = local([t for t, _ in pairs]), local([f for _, f in pairs])
        torch._foreach_mul_(ts, [f.to(t.dtype) for t, f in zip(ts, fs)])


def mix(a: list, b: list, weight: float) -> list:
    """(1 - weight) * a + weight * b per parameter, in a's storage; a missing entry counts as zero.

    Lists are aligned (None = no gradient for that parameter); the result is None where both are.
    """
    out = [None] * len(a)
    idx = [i for i, (x, y) in enumerate(zip(a, b)) if x is not None or y is not None]
    if not idx:
        return out
    xs = [a[i] if a[i] is not None else torch.zeros_like(b[i]) for i in idx]
    ys = [b[i] if b[i] is not None else torch.zeros_like(a[i]) for i in idx]
    torch._foreach_mul_(xs, 1.0 - weight)
    torch._foreach_add_(xs, ys, alpha=weight)
    for i, x in zip(idx, xs):
        out[i] = x
    return out


# ---- collectives ----------------------------------------------------------------------------------
def all_mean_(tensors: Tensors, world: int, flat: bool = False) -> None:
    """Each tensor becomes its mean over the `world` processes of the default group, in place.

    flat=True: one all-reduce of the tensors concatenated (one dtype), else one per tensor.
    """
    if not tensors:
        return
    if not flat:
        for t in tensors:
            torch.distributed.all_reduce(t)
            t.div_(world)
        return
    buffer = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(buffer)
    buffer.div_(world)
    for t, x in zip(tensors, buffer.split([t.numel() for t in tensors])):
        t.copy_(x.view_as(t))


def mean_over_processes(value: torch.Tensor, device) -> torch.Tensor:
    """The mean of `value` over all processes of the default group (`value` itself without one)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    total = value.to(device).clone()  # NCCL reduces device tensors
    dist.all_reduce(total)
    return total / dist.get_world_size()


# ---- side passes ------------------------------------------------------------------------------------
@contextmanager
def isolated(tensors: Tensors):
    """A block after which the global RNG and `tensors` (BatchNorm statistics, weights) are as before."""
    saved = snapshot(tensors)
    rng = rng_state()
    try:
        yield
    finally:
        set_rng_state(rng)
        restore_(tensors, saved)
