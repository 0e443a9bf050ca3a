"""Seeing sharpness: Hessian eigenvalues and trace, m-sharpness, and a Trainer callback that logs them.

Every measurement is a plain function of a model and an iterable of batches (dicts passed as
`model(**batch)`), and reads the loss as the Trainer reads it: `outputs["loss"]` for a dict or a
ModelOutput, `outputs[0]` for a tuple. The measured loss is the average of the batch losses,
L(w) = (1/B) sum_b L_b(w), so a Hessian-vector product is (1/B) sum_b H_b v.

- `hessian_eigenvalues`: the k eigenvalues of largest magnitude, signed, or the k largest (Lanczos
  with full reorthogonalisation, or power iteration with deflation);
- `hessian_trace`: Hutchinson's estimator with Rademacher vectors (or Hutch++), with its standard error;
- `hessian_eigenvalues_by_group`: the top eigenvalue of each diagonal block (one per module, or per given group);
- `m_sharpness`: mean over chunks of m samples of L(w + e) - L(w), e = rho g / ||g|| from the chunk's
  own gradient (Foret et al. 2021); ASAM's scaled form with `adaptive=True` (Kwon et al. 2021);
  `steps > 1` of projected ascent (worst case) or random directions (`kind="average"`), as in
  Andriushchenko et al. 2023.

Hessian-vector products are double backward passes (`torch.autograd.grad(create_graph=True)` on the
gradient, then the gradient of g.v); the graph is freed after every product. Vectors live in fp32;
the forward runs in the parameters' own dtype.

What a measurement leaves as it found it: the weights (bit-identical: Hessian products only read
them, m-sharpness copies them back from an exact snapshot), the caller's `.grad` (never written:
every gradient comes from `torch.autograd.grad`), each module's train/eval flag, and buffers
(BatchNorm running statistics; evaluation mode by default, and with `train_mode=True` the buffers
are snapshotted and copied back). Under DDP (torch.distributed initialised, world size > 1) every
rank passes its own share of the batches; the sums are all-reduced, so each rank returns the mean
over the union of the batches (for Hessian products the vector is all-reduced at every iteration,
since `autograd.grad` bypasses DDP's hooks; the double backward runs on the unwrapped `model.module`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from transformers import TrainerCallback

from . import ops

MEASURES = ("top_eigenvalue", "trace", "m_sharpness")


# -----------------------------------------------------------------------------
# Plumbing: which parameters, the loss, devices, DDP


def _unwrap_ddp(model):
    """The module inside DistributedDataParallel / DataParallel (their hooks play no part here)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _select(model, params):
    """[(name, parameter)]: every trainable parameter (params=None) or the named ones, in model order."""
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("params=None selects the trainable parameters, but the model has none "
                             "(every parameter has requires_grad=False); pass a list of names.")
        return chosen
    if isinstance(params, str):
        params = [params]
    wanted = list(params)
    index = dict(named)
    missing = [n for n in wanted if n not in index]
    if missing:
        raise ValueError(f"params: the model has no parameter named {', '.join(map(repr, missing[:5]))}; "
                         f"some of its names: {', '.join(n for n, _ in named[:8])}.")
    if not wanted:
        raise ValueError("params: an empty list; pass None (every trainable parameter) or parameter names.")
    keep = set(wanted)
    return [(n, p) for n, p in named if n in keep]


def read_loss(outputs):
    """The loss as the Trainer reads it: outputs["loss"] for a dict / ModelOutput, outputs[0] otherwise."""
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    elif isinstance(outputs, (tuple, list)) and outputs:
        loss = outputs[0]
    else:
        loss = outputs
    if not torch.is_tensor(loss) or loss.numel() != 1:
        raise ValueError("the model returned no loss: sharpness is measured on the model's own loss, so every batch "
                         "must carry the labels the model needs (e.g. a 'labels' key), and the model must return "
                         "'loss' (a dict / ModelOutput) or the loss first (a tuple).")
    return loss.reshape(())


def _to_device(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _loss(model, batch, device):
    if not isinstance(batch, Mapping):
        raise ValueError(f"batches must be dicts passed as model(**batch), got a {type(batch).__name__}.")
    return read_loss(model(**_to_device(batch, device))).float()


def _world():
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_world_size()
    return 1


def _allreduce_sum_(tensors):
    """Sum a list of tensors over the ranks, in place (one collective on one flat buffer)."""
    if _world() == 1 or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return tensors


@contextmanager
def _measuring(model, named, train_mode=False, moves_weights=False):
    """Evaluation mode (or train mode) with requires_grad on the measured parameters; everything put back.

    moves_weights: the measurement perturbs the weights, so an exact copy is taken first (and yielded);
    they are copied back from it at the end. Hessian products read the weights only and need no copy.
    """
    modes = [(m, m.training) for m in model.modules()]
    grad_flags = [(p, p.requires_grad) for _, p in named]
    buffers = ops.snapshot([b for b in model.buffers()]) if train_mode else None
    weights = ops.snapshot([p for _, p in named]) if moves_weights else None
    model.train(train_mode)
    for _, p in named:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield weights
    finally:
        if weights is not None:
            ops.restore_([p for _, p in named], weights)
        if buffers is not None:
            ops.restore_(list(model.buffers()), buffers)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag


def _math_attention():
    """scaled_dot_product_attention through its plain-math kernel, the one with a double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _gen(seed):
    return torch.Generator().manual_seed(int(seed))


def _like(params, make):
    """fp32 tensors shaped like `params`, drawn on the CPU from `make(shape)` (identical on every rank)."""
    return [make(p.shape).to(device=p.device, dtype=torch.float32) for p in params]


def _dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def _norm(a):
    return torch.sqrt(_dot(a, a))


def _axpy_(y, alpha, x):
    torch._foreach_add_(y, x, alpha=alpha)


class _HVP:
    """v -> (1/B) sum_b H_b v over the batches (all ranks' batches under DDP), in fp32. Counts the products."""

    def __init__(self, model, batches, params):
        self.model, self.params = model, params
        self.batches = list(batches)
        self.device = params[0].device
        count = torch.tensor([float(len(self.batches))], device=self.device)
        self.total = _allreduce_sum_([count])[0].item()
        if self.total == 0:
            raise ValueError("batches is empty: pass at least one batch (dict) to measure on.")
        self.products = 0

    def __call__(self, v):
        out = [torch.zeros_like(x) for x in v]
        for batch in self.batches:
            with _math_attention():  # fused attention kernels have no double backward
                loss = _loss(self.model, batch, self.device)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            gv = sum((g.float() * x).sum() for g, x in zip(grads, v) if g is not None)
            if torch.is_tensor(gv) and gv.requires_grad:
                hv = torch.autograd.grad(gv, self.params, allow_unused=True)
                torch._foreach_add_(out, [h.float() if h is not None else torch.zeros_like(o)
                                          for h, o in zip(hv, out)])
            del loss, grads, gv  # the graph goes now, not at the next product
        _allreduce_sum_(out)
        torch._foreach_div_(out, self.total)
        self.products += 1
        return out


# -----------------------------------------------------------------------------
# Hessian eigenvalues


def hessian_eigenvalues(model, batches, k=1, *, params=None, iters=100, tol=1e-4, seed=0, method="lanczos",
                        which="magnitude", train_mode=False, return_vectors=False):
    """The k Hessian eigenvalues of largest magnitude, with their sign, ordered by magnitude.

    which="largest": the k algebraically largest instead (lambda_max first: the "sharpness" of the
    literature; at a point that is not a minimum the largest magnitude may be a negative curvature).
    method="lanczos" (default): Lanczos with full reorthogonalisation. Holds up to `iters`
    parameter-sized fp32 vectors; robust when eigenvalues of nearly equal magnitude compete (a +-pair).
    method="power": power iteration with deflation; holds k + 1 vectors, for models too large for
    Lanczos' basis; needs many more products when |lambda_2 / lambda_1| is close to 1, and which="largest"
    costs one extra run (a shift by the top magnitude).
    Both stop when every residual ||H v - lambda v|| is below tol * |lambda_1|, or after `iters` products
    (per eigenvalue for power iteration).
    Cost: each Hessian-vector product is one forward and two backward passes per batch.
    return_vectors=True also returns the eigenvectors (lists of fp32 tensors shaped like the parameters).
    """
    if method not in ("power", "lanczos"):
        raise ValueError(f"method={method!r}: choose 'power' or 'lanczos'.")
    if which not in ("magnitude", "largest"):
        raise ValueError(f"which={which!r}: choose 'magnitude' or 'largest'.")
    if int(k) < 1 or int(iters) < 1:
        raise ValueError(f"k={k} and iters={iters} must be at least 1.")
    model = _unwrap_ddp(model)
    named = _select(model, params)
    ps = [p for _, p in named]
    n = sum(p.numel() for p in ps)
    if k > n:
        raise ValueError(f"k={k}: the selected parameters have only {n} entries.")
    args = (ps, int(k), int(iters), float(tol), _gen(seed), n)
    with _measuring(model, named, train_mode):
        hvp = _HVP(model, batches, ps)
        if method == "lanczos":
            values, vectors = _lanczos(hvp, *args, which=which)
        else:
            values, vectors = _power(hvp, *args)
            if which == "largest" and (k > 1 or values[0] < 0):
                # H + s I with s = |lambda_top| has no negative eigenvalue: its largest magnitudes are
                # H's algebraically largest eigenvalues, shifted by s
                shift = abs(values[0])

                def shifted(v):
                    hv = hvp(v)
                    _axpy_(hv, shift, v)
                    return hv

                values, vectors = _power(shifted, *args)
                values = [v - shift for v in values]
    key = (lambda i: -values[i]) if which == "largest" else (lambda i: -abs(values[i]))
    order = sorted(range(len(values)), key=key)
    values, vectors = [values[i] for i in order], [vectors[i] for i in order]
    return (values, vectors) if return_vectors else values


def _orthogonalise_(v, basis):
    for u in basis:
        _axpy_(v, -_dot(u, v).item(), u)


def _unit(v):
    norm = _norm(v).item()
    if norm == 0.0 or not math.isfinite(norm):
        return None
    torch._foreach_div_(v, norm)
    return v


def _power(hvp, ps, k, iters, tol, gen, n):
    values, vectors = [], []
    for _ in range(k):
        v = _like(ps, lambda shape: torch.randn(shape, generator=gen))
        _orthogonalise_(v, vectors)
        v = _unit(v)
        value = 0.0
        for _ in range(iters):
            hv = hvp(v)
            _orthogonalise_(hv, vectors)  # deflation: the operator restricted to the complement of the found vectors
            value = _dot(v, hv).item()  # Rayleigh quotient of the unit vector v
            residual = [h - value * x for h, x in zip(hv, v)]
            scale = max(abs(values[0]) if values else abs(value), 1e-30)
            nxt = _unit(hv)
            if _norm(residual).item() <= tol * scale or nxt is None:
                break
            v = nxt
        values.append(value)
        vectors.append(v)
    return values, vectors


def _lanczos(hvp, ps, k, iters, tol, gen, n, which="magnitude"):
    m = min(iters, n)
    q = _unit(_like(ps, lambda shape: torch.randint(0, 2, shape, generator=gen).float() * 2 - 1))
    basis, alphas, betas = [q], [], []

    def wanted(evals):
        key = evals if which == "largest" else evals.abs()
        return torch.argsort(key, descending=True)[:k]

    for j in range(m):
        w = hvp(basis[j])
        alpha = _dot(basis[j], w).item()
        alphas.append(alpha)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            _orthogonalise_(w, basis)
        beta = _norm(w).item()
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        top = wanted(evals)
        scale = max(evals.abs().max().item(), 1e-30)
        residuals = (beta * evecs[-1, top]).abs()  # ||H y - theta y|| of each Ritz pair
        if len(alphas) >= k and (residuals <= tol * scale).all():
            break
        if beta <= 1e-10 * scale or j == m - 1:
            break  # invariant subspace found, or the budget is spent
        torch._foreach_div_(w, beta)
        basis.append(w)
        betas.append(beta)
    top = wanted(evals).tolist()
    if len(top) < k:
        raise ValueError(f"k={k}: the Hessian's Krylov space has only {len(top)} directions here; "
                         "pass a smaller k or method='power'.")
    values, vectors = [evals[i].item() for i in top], []
    for i in top:  # Ritz vectors: V s
        y = [torch.zeros_like(p, dtype=torch.float32) for p in ps]
        for coef, q in zip(evecs[:, i].tolist(), basis):
            _axpy_(y, coef, q)
        vectors.append(y)
    return values, vectors


def hessian_eigenvalues_by_group(model, batches, groups=None, *, iters=50, tol=1e-3, seed=0, method="lanczos",
                                 which="magnitude", train_mode=False):
    """Top eigenvalue (largest magnitude, signed; or the largest with which="largest") of each diagonal
    block of the Hessian.

    groups: {label: [parameter names]}; default one group per module that holds trainable parameters
    (its weight and bias together). Cost: the products of `hessian_eigenvalues` once per group
    (a product w.r.t. a block still runs the whole forward and backward), so per-layer results cost
    the number of groups times a top eigenvalue.
    """
    model = _unwrap_ddp(model)
    if groups is None:
        groups = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                groups.setdefault(name.rpartition(".")[0] or name, []).append(name)
    batches = list(batches)
    return {label: hessian_eigenvalues(model, batches, 1, params=names, iters=iters, tol=tol, seed=seed,
                                       method=method, which=which, train_mode=train_mode)[0]
            for label, names in groups.items()}


# -----------------------------------------------------------------------------
# Hessian trace


def hessian_trace(model, batches, *, samples=100, params=None, seed=0, method="hutchinson", train_mode=False,
                  return_stderr=False):
    """Tr(H) by Hutchinson's estimator, mean over `samples` Rademacher z of z^T H z (one product each).

    return_stderr=True returns (trace, standard error), the standard error being the sample standard
    deviation of z^T H z over sqrt(samples). method="hutchpp" is Hutch++ (Meyer et al. 2021): a third
    of the products sketch the top of the spectrum (Q = orth(H S)), its trace is taken exactly
    (Tr(Q^T H Q)), and the rest is Hutchinson on the remainder (I - QQ^T) H (I - QQ^T); the standard
    error is the remainder's. Hutch++ holds samples/3 parameter-sized vectors in memory.
    """
    if method not in ("hutchinson", "hutchpp"):
        raise ValueError(f"method={method!r}: choose 'hutchinson' or 'hutchpp'.")
    samples = int(samples)
    if samples < (3 if method == "hutchpp" else 2):
        raise ValueError(f"samples={samples}: need at least 2 (3 for hutchpp) to estimate a standard error.")
    model = _unwrap_ddp(model)
    named = _select(model, params)
    ps = [p for _, p in named]
    gen = _gen(seed)

    def rademacher():
        return _like(ps, lambda shape: torch.randint(0, 2, shape, generator=gen).float() * 2 - 1)

    with _measuring(model, named, train_mode):
        hvp = _HVP(model, batches, ps)
        exact, basis = 0.0, []
        if method == "hutchpp":
            sketch = samples // 3
            for _ in range(sketch):
                y = hvp(rademacher())
                for _ in range(2):
                    _orthogonalise_(y, basis)
                y = _unit(y)
                if y is not None:
                    basis.append(y)
            for q in basis:
                exact += _dot(q, hvp(q)).item()
            samples = samples - 2 * sketch
        values = []
        for _ in range(samples):
            z = rademacher()
            _orthogonalise_(z, basis)  # (I - QQ^T) z
            hz = hvp(z)
            values.append(_dot(z, hz).item())
    mean = sum(values) / len(values)
    var = sum((x - mean) ** 2 for x in values) / (len(values) - 1)
    trace, stderr = exact + mean, math.sqrt(var / len(values))
    return (trace, stderr) if return_stderr else trace


# -----------------------------------------------------------------------------
# m-sharpness


def split_batch(batch, m):
    """Chunks of m samples: every tensor of the dict sliced along dim 0 (the last chunk may be smaller)."""
    sizes = {v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"m_sharpness with m set splits every tensor of a batch along dim 0, but the batch's "
                         f"tensors have first dimensions {sorted(sizes)}.")
    n = sizes.pop()
    if m is None or m >= n:
        return [batch]
    return [{k: (v[i:i + m] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in batch.items()}
            for i in range(0, n, m)]


def m_sharpness(model, batches, rho, *, m=None, adaptive=False, eta=0.01, params=None, steps=1, kind="worst",
                seed=0, train_mode=False, eps=1e-12):
    """Mean over chunks of m samples of L_chunk(w + e) - L_chunk(w).

    kind="worst" (Foret et al. 2021): e = rho T^2 g / ||T g|| from the chunk's own gradient g at w,
    T = |w| + eta for tensors whose name ends in "weight" when adaptive (ASAM, Kwon et al. 2021),
    T = 1 otherwise; steps > 1: projected normalised ascent in delta = T^-1 e (step rho, back onto
    ||delta|| <= rho after each step), the largest loss seen counts (Andriushchenko et al. 2023).
    kind="average": e = rho T z / ||z|| for a standard Gaussian z, averaged over `steps` directions.
    m=None: each batch is one chunk. A batch whose size is not a multiple of m ends in a smaller chunk.
    Cost per chunk: worst, (1 + steps) forward and `steps` backward passes (the last step needs no
    backward); average, 1 + steps forwards and no backward.
    """
    rho = float(rho)
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho={rho}: must be a finite number >= 0.")
    if kind not in ("worst", "average"):
        raise ValueError(f"kind={kind!r}: choose 'worst' or 'average'.")
    if int(steps) < 1:
        raise ValueError(f"steps={steps}: must be at least 1.")
    if m is not None and int(m) < 1:
        raise ValueError(f"m={m}: must be a positive number of samples or None (the whole batch).")
    model = _unwrap_ddp(model)
    named = _select(model, params)
    names, ps = [n for n, _ in named], [p for _, p in named]
    device = ps[0].device
    gen = _gen(seed)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of increases, number of chunks]
    with _measuring(model, named, train_mode, moves_weights=True) as w0:
        scale = ops.adaptive_weights(w0, names, eta) if adaptive else [None] * len(ps)
        T = [t.float() if t is not None else None for t in scale]

        def tmul(xs):  # T x (T = 1 where None)
            return [x * t if t is not None else x for x, t in zip(xs, T)]

        def move_to(delta):  # w = w0 + T delta
            e = tmul(delta)
            with torch.no_grad():
                for p, w, x in zip(ps, w0, e):
                    p.copy_(w + x.to(p.dtype))

        for batch in batches:
            for chunk in split_batch(batch, None if m is None else int(m)):
                ops.restore_(ps, w0)
                if kind == "average":
                    with torch.no_grad():
                        base = _loss(model, chunk, device).item()
                        losses = []
                        for _ in range(int(steps)):
                            z = _like(ps, lambda shape: torch.randn(shape, generator=gen))
                            torch._foreach_mul_(z, rho / max(_norm(z).item(), eps))
                            move_to(z)
                            losses.append(_loss(model, chunk, device).item())
                    total += torch.tensor([sum(losses) / len(losses) - base, 1.0], dtype=torch.float64,
                                          device=device)
                    continue
                delta = [torch.zeros_like(p, dtype=torch.float32) for p in ps]
                base, best = None, -math.inf
                for step in range(int(steps) + 1):
                    last = step == int(steps)
                    if last:
                        with torch.no_grad():
                            loss = _loss(model, chunk, device)
                    else:
                        loss = _loss(model, chunk, device)
                        grads = torch.autograd.grad(loss, ps, allow_unused=True)
                    value = loss.item()
                    if step == 0:
                        base = value
                    else:
                        best = max(best, value)
                    if last:
                        break
                    tg = tmul([g.float() if g is not None else torch.zeros_like(d) for g, d in zip(grads, delta)])
                    norm = _norm(tg).item()
                    if norm == 0.0 or not math.isfinite(norm):
                        break  # no ascent direction: the chunk counts with the losses seen
                    _axpy_(delta, rho / (norm + eps), tg)
                    length = _norm(delta).item()
                    if length > rho:
                        torch._foreach_mul_(delta, rho / length)
                    move_to(delta)
                increase = (best if best > -math.inf else base) - base
                total += torch.tensor([increase, 1.0], dtype=torch.float64, device=device)
    _allreduce_sum_([total])
    if total[1].item() == 0:
        raise ValueError("batches is empty: pass at least one batch (dict) to measure on.")
    return (total[0] / total[1]).item()


# -----------------------------------------------------------------------------
# The Trainer callback


class SharpnessCallback(TrainerCallback):
    """Measure sharpness on a fixed held-out set during training and log it beside the loss.

    Logs `sharpness/top_eigenvalue` (lambda_max, the largest Hessian eigenvalue), `sharpness/trace`,
    `sharpness/m_sharpness` (those in `measures`)
    through `trainer.log`, so they reach `trainer_state.json`'s log_history and every reporting
    integration (TensorBoard, W&B, ...). Works with any Trainer (stock `Trainer`, `SAMTrainer`, ...):

        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=valid)
        SharpnessCallback.attach(trainer, max_batches=4)          # held-out set: the trainer's eval set
        SharpnessCallback.attach(trainer, eval_batches=batches)    # or a list of dicts
        SharpnessCallback.attach(trainer, eval_dataset=ds, data_collator=collate, every=100)

    every: "eval" (after each evaluation) or a number of optimizer steps. The held-out batches are
    drawn once and reused: `eval_batches` (a list of dicts), else the first `max_batches` batches of
    `eval_dataset` (with `data_collator`, `batch_size`), else of the trainer's eval dataloader.
    Under DDP every rank measures its share (eval_batches: what each rank was given; a dataset: every
    world_size-th batch) and the logged value is the mean over all of them.
    Without a trainer (passed in `callbacks=[...]` only) the values go to state.log_history alone.
    `seconds` holds the duration of each measurement.
    """

    def __init__(self, eval_batches=None, *, eval_dataset=None, data_collator=None, batch_size=32, max_batches=4,
                 every="eval", measures=MEASURES, rho=0.05, m=None, adaptive=False, eta=0.01, steps=1, iters=20,
                 tol=1e-3, samples=10, params=None, seed=0, trainer=None):
        measures = (measures,) if isinstance(measures, str) else tuple(measures)
        unknown = [x for x in measures if x not in MEASURES]
        if unknown or not measures:
            raise ValueError(f"measures={list(measures)}: choose among {', '.join(MEASURES)}.")
        if not (every == "eval" or (isinstance(every, int) and not isinstance(every, bool) and every > 0)):
            raise ValueError(f"every={every!r}: 'eval' or a positive number of steps.")
        if eval_dataset is not None and eval_batches is not None:
            raise ValueError("give eval_batches or eval_dataset, not both.")
        self.measures, self.every, self.trainer = measures, every, trainer
        self.eval_batches, self.eval_dataset, self.data_collator = eval_batches, eval_dataset, data_collator
        self.batch_size, self.max_batches = batch_size, max_batches
        self.settings = dict(rho=rho, m=m, adaptive=adaptive, eta=eta, steps=steps, iters=iters, tol=tol,
                             samples=samples, params=params, seed=seed)
        self._batches = None
        self._warned = False
        self._last_step = None
        self.seconds = []

    @classmethod
    def attach(cls, trainer, **kwargs):
        """Build the callback for `trainer` (it logs through trainer.log) and add it to the trainer."""
        callback = cls(trainer=trainer, **kwargs)
        trainer.add_callback(callback)
        return callback

    # ---- events (one measurement per optimizer step at most: several eval sets, or an evaluate()
    # call right after the last epoch's evaluation, measure the same weights) ----
    def on_evaluate(self, args, state, control, model=None, eval_dataloader=None, **kwargs):
        if self.every == "eval" and state.global_step != self._last_step:
            self._log(state, self.measure(model, eval_dataloader))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every != "eval" and state.global_step % self.every == 0 and state.global_step != self._last_step:
            self._log(state, self.measure(model))

    # ---- work ----
    def held_out_batches(self, eval_dataloader=None):
        """The fixed batches measured on (this rank's share), drawn on first use."""
        if self._batches is None:
            from itertools import islice

            world = _world()
            rank = torch.distributed.get_rank() if world > 1 else 0
            if self.eval_batches is not None:
                batches = list(self.eval_batches)
            elif self.eval_dataset is not None:
                loader = torch.utils.data.DataLoader(self.eval_dataset, batch_size=self.batch_size, shuffle=False,
                                                     collate_fn=self.data_collator)
                limit = None if self.max_batches is None else self.max_batches * world
                batches = list(islice(loader, limit))[rank::world]
            else:
                if self.trainer is not None and getattr(self.trainer, "eval_dataset", None) is not None:
                    eval_dataloader = self.trainer.get_eval_dataloader()  # already sharded per rank
                if eval_dataloader is None:
                    raise ValueError("SharpnessCallback has no held-out data: pass eval_batches, eval_dataset "
                                     "(+ data_collator), or attach it to a trainer that has an eval_dataset.")
                batches = list(islice(eval_dataloader, self.max_batches))
            if not batches:
                raise ValueError("SharpnessCallback: the held-out set is empty.")
            self._batches = batches
        return self._batches

    def measure(self, model, eval_dataloader=None):
        """{"sharpness/<measure>": value} for the current weights."""
        if model is None:
            model = self.trainer.model
        batches = self.held_out_batches(eval_dataloader)
        s = self.settings
        start = time.perf_counter()
        out = {}
        if "top_eigenvalue" in self.measures:
            out["sharpness/top_eigenvalue"] = hessian_eigenvalues(
                model, batches, 1, params=s["params"], iters=s["iters"], tol=s["tol"], seed=s["seed"],
                which="largest")[0]
        if "trace" in self.measures:
            out["sharpness/trace"] = hessian_trace(model, batches, samples=s["samples"], params=s["params"],
                                                   seed=s["seed"])
        if "m_sharpness" in self.measures:
            out["sharpness/m_sharpness"] = m_sharpness(
                model, batches, s["rho"], m=s["m"], adaptive=s["adaptive"], eta=s["eta"], params=s["params"],
                steps=s["steps"], seed=s["seed"])
        self.seconds.append(time.perf_counter() - start)
        return out

    def _log(self, state, values):
        self._last_step = state.global_step
        if self.trainer is not None:
            self.trainer.log(dict(values))
            return
        state.log_history.append({**values, "epoch": state.epoch, "step": state.global_step})
        if not self._warned:
            self._warned = True
            warnings.warn("SharpnessCallback without a trainer writes to trainer_state.json only; use "
                          "SharpnessCallback.attach(trainer, ...) (or trainer=) so TensorBoard/W&B see the values.",
                          stacklevel=2)
