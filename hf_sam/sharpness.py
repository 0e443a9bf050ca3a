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
are snapshotted and copied back), and every random-number state (`preserved_rng`: torch's CPU and CUDA
generators, Python's and NumPy's, a data loader's). Each measurement logs its cost before it starts
(passes, then seconds once the first unit is timed), shows a progress bar when long, and stops early
at `max_seconds`, saying what it did (`return_info=True`: a report). Under DDP (torch.distributed
initialised, world size > 1) every rank passes its own share of the batches; the sums are all-reduced,
so each rank returns the mean over the union of the batches (for Hessian products the vector is
all-reduced at every iteration, since `autograd.grad` bypasses DDP's hooks; the double backward runs on
the unwrapped `model.module`).
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
import warnings
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext

import torch
from transformers import TrainerCallback

from . import ops
from .losses import unwrap_model

MEASURES = ("top_eigenvalue", "trace", "m_sharpness")
logger = logging.getLogger(__name__)
# a measurement whose projected time exceeds this says so at WARNING level (visible by default; once per
# kind of measurement, INFO after that) and shows a progress bar on a terminal; shorter ones log at INFO only
LONG_SECONDS = 30.0
_clock = time.perf_counter  # the budget's clock (tests put a fake one here)


# -----------------------------------------------------------------------------
# Plumbing: which parameters, the loss, devices, DDP


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


def _generators(loaders):
    """The torch.Generator objects a data loader draws from: its own, its sampler's, its batch sampler's."""
    found = []
    for loader in loaders:
        for owner in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                      getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
            for attr in ("generator", "synchronized_generator"):
                g = getattr(owner, attr, None)
                if isinstance(g, torch.Generator) and all(g is not x for x in found):
                    found.append(g)
    return found


@contextmanager
def preserved_rng(*loaders):
    """Every random-number state a measurement can touch, put back on exit: torch's CPU generator, the
    initialised CUDA devices' generators (all of them), Python's `random`, NumPy's global generator, and
    the generators of the given data loaders (their own, their samplers'). A measurement inside leaves
    the caller's random stream where it was, so a training run draws the same dropout masks and the
    same shuffles with or without it."""
    torch_state = ops.rng_state()
    py_state = random.getstate()
    np_random = getattr(sys.modules.get("numpy"), "random", None)  # only if the caller imported numpy
    np_state = np_random.get_state() if np_random is not None else None
    gens = _generators(loaders)
    gen_states = [g.get_state() for g in gens]
    try:
        yield
    finally:
        ops.set_rng_state(torch_state)
        random.setstate(py_state)
        if np_state is not None:
            np_random.set_state(np_state)
        for g, state in zip(gens, gen_states):
            g.set_state(state)


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
        with torch.enable_grad(), preserved_rng():
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


_ANNOUNCED = set()  # (kind of message, measurement) already said at WARNING level: later ones go to INFO


def _say(kind, what, message, *args):
    """A message that matters at WARNING level the first time per measurement kind in this process (a
    callback, or a script measuring many checkpoints, repeats itself), at INFO after that; rank 0 only."""
    first = (kind, what) not in _ANNOUNCED and _rank() == 0
    if first:
        _ANNOUNCED.add((kind, what))
    logger.log(logging.WARNING if first else logging.INFO, message, *args)


def _rank():
    return torch.distributed.get_rank() if _world() > 1 else 0


def _check_budget(max_seconds, progress):
    if max_seconds is not None:
        value = float(max_seconds)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"max_seconds={max_seconds!r}: a positive number of seconds, or None (no limit).")
        max_seconds = value
    if progress not in (None, True, False):
        raise ValueError(f"progress={progress!r}: None (a bar on a terminal for long measurements), True or False.")
    return max_seconds


class _Meter:
    """The work of one measurement, in units (Hessian-vector products, chunks) of `passes` passes each (a pass:
    one forward or one backward over one batch). Logs the cost before the first unit (in passes) and after
    it (in seconds, from its time); shows a progress bar for long measurements; keeps `max_seconds`.

    out_of_time(): whether the next unit would overrun max_seconds (never before `minimum` units). With
    sync (the Hessian products, all-reduced at every product) the ranks of a DDP run agree on it.
    """

    def __init__(self, what, units, unit, passes, max_seconds=None, progress=None, minimum=1, device=None,
                 sync=True):
        self.what, self.units, self.unit, self.passes = what, int(units), unit, int(passes)
        self.max_seconds, self.progress, self.minimum = max_seconds, progress, int(minimum)
        self.device, self.sync = device, sync
        self.done, self.cut, self.bar = 0, False, None
        self.start = _clock()
        budget = f"; max_seconds={max_seconds:g}" if max_seconds is not None else ""
        logger.info("%s: at most %d %ss of %d passes each (%d passes; a pass: one forward or one backward "
                    "over one batch)%s", what, self.units, unit, self.passes, self.units * self.passes, budget)

    def tick(self):
        self.done += 1
        if self.done == 1:
            self._estimate()
        elif self.bar is not None:
            self.bar.update(1)

    def _estimate(self):
        per = _clock() - self.start
        projected = per * self.units
        bounded = projected if self.max_seconds is None else min(projected, self.max_seconds)
        long = bounded > LONG_SECONDS
        cap = f", stopped at max_seconds={self.max_seconds:g}" if self.max_seconds is not None else \
            " (max_seconds= caps it)"
        message = ("%s: the first %s took %.3g s; at most %d %ss: about %.0f s%s", self.what, self.unit, per,
                   self.units, self.unit, projected, cap)
        if long:
            _say("estimate", self.what, *message)
        else:
            logger.info(*message)
        if _rank() == 0 and self.units > 1 and (self.progress or (self.progress is None and long)):
            from tqdm.auto import tqdm

            # every unit is a Hessian product or a chunk (long): show each one (mininterval 0), so
            # what the bar says does not depend on how fast the machine is
            self.bar = tqdm(total=self.units, initial=1, desc=self.what, unit=self.unit, leave=False, mininterval=0,
                            disable=None if self.progress is None else False)  # None: only on a terminal

    def out_of_time(self):
        if self.max_seconds is None:
            return False
        stop = False
        if self.done >= self.minimum:
            elapsed = _clock() - self.start
            stop = elapsed + elapsed / max(self.done, 1) > self.max_seconds
        if self.sync and _world() > 1:
            flag = torch.tensor([float(stop)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = flag.item() > 0
        self.cut = self.cut or stop
        return stop

    def close(self, reason, detail="", **extra):
        """The report: {"stopped": reason or "max_seconds", units done, passes, seconds, **extra}."""
        if self.bar is not None:
            self.bar.close()
        seconds = _clock() - self.start
        if self.cut:
            reason = "max_seconds"
            _say("stopped", self.what, "%s: stopped by max_seconds=%g after %d of %d %ss (%.1f s)%s", self.what,
                 self.max_seconds, self.done, self.units, self.unit, seconds, detail)
        return {"stopped": reason, f"{self.unit}s": self.done, "passes": self.done * self.passes,
                "seconds": seconds, **extra}


class _HVP:
    """v -> (1/B) sum_b H_b v over the batches (all ranks' batches under DDP), in fp32. Counts the products."""

    PASSES = 3  # per batch: a forward, a backward that keeps its graph, a backward through it

    def __init__(self, model, batches, params):
        self.model, self.params = model, params
        self.batches = list(batches)
        self.device = params[0].device
        count = torch.tensor([float(len(self.batches))], device=self.device)
        self.total = _allreduce_sum_([count])[0].item()
        if self.total == 0:
            raise ValueError("batches is empty: pass at least one batch (dict) to measure on.")
        self.products = 0
        self.meter = None

    def metered(self, what, units, max_seconds, progress, minimum=1):
        self.meter = _Meter(what, units, "product", self.PASSES * len(self.batches), max_seconds, progress,
                            minimum, self.device)
        return self.meter

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
        if self.meter is not None:
            self.meter.tick()
        return out


# -----------------------------------------------------------------------------
# Hessian eigenvalues


def hessian_eigenvalues(model, batches, k=1, *, params=None, iters=100, tol=1e-4, seed=0, method="lanczos",
                        which="magnitude", train_mode=False, return_vectors=False, max_seconds=None, progress=None,
                        return_info=False):
    """The k Hessian eigenvalues of largest magnitude, with their sign, ordered by magnitude.

    which="largest": the k algebraically largest instead (lambda_max first: the "sharpness" of the
    literature; at a point that is not a minimum the largest magnitude may be a negative curvature).
    method="lanczos" (default): Lanczos with full reorthogonalisation. Holds up to `iters`
    parameter-sized fp32 vectors; robust when eigenvalues of nearly equal magnitude compete (a +-pair).
    method="power": power iteration with deflation; holds k + 1 vectors, for models too large for
    Lanczos' basis; needs many more products when |lambda_2 / lambda_1| is close to 1, and which="largest"
    costs one extra run (a shift by the top magnitude).
    Both stop when every residual ||H v - lambda v|| is below tol * |lambda_1|, or after `iters` products
    (per eigenvalue for power iteration), or before a product that would overrun `max_seconds` (after
    at least k products; Lanczos then returns its current Ritz values, power iteration its current
    Rayleigh quotients, and a warning gives the residual reached).
    Cost: each Hessian-vector product is one forward and two backward passes per batch; the estimate is
    logged before the first product (in passes) and after it (in seconds: at WARNING level when it is
    over LONG_SECONDS, the first time per kind of measurement, with a progress bar on a terminal;
    progress=True / False forces the bar on / off).
    return_vectors=True also returns the eigenvectors (lists of fp32 tensors shaped like the parameters);
    return_info=True also returns (last) a report: {"stopped": "converged" | "iters" | "max_seconds",
    "products", "passes", "seconds", "residual": the largest ||H v - lambda v|| / |lambda_1| of the pairs}.
    """
    if method not in ("power", "lanczos"):
        raise ValueError(f"method={method!r}: choose 'power' or 'lanczos'.")
    if which not in ("magnitude", "largest"):
        raise ValueError(f"which={which!r}: choose 'magnitude' or 'largest'.")
    if int(k) < 1 or int(iters) < 1:
        raise ValueError(f"k={k} and iters={iters} must be at least 1.")
    max_seconds = _check_budget(max_seconds, progress)
    model = unwrap_model(model, peft=False)
    named = _select(model, params)
    ps = [p for _, p in named]
    n = sum(p.numel() for p in ps)
    if k > n:
        raise ValueError(f"k={k}: the selected parameters have only {n} entries.")
    args = (ps, int(k), int(iters), float(tol), _gen(seed), n)
    with _measuring(model, named, train_mode):
        hvp = _HVP(model, batches, ps)
        if method == "lanczos":
            units = min(int(iters), n)
        else:
            units = int(iters) * int(k) * (2 if which == "largest" else 1)
        meter = hvp.metered(f"hessian_eigenvalues ({method}, k={k})", units, max_seconds, progress, minimum=int(k))
        if method == "lanczos":
            values, vectors, reason, residual = _lanczos(hvp, *args, which=which)
        else:
            values, vectors, reason, residual = _power(hvp, *args)
            if which == "largest" and (k > 1 or values[0] < 0):
                # H + s I with s = |lambda_top| has no negative eigenvalue: its largest magnitudes are
                # H's algebraically largest eigenvalues, shifted by s
                shift = abs(values[0])

                def shifted(v):
                    hv = hvp(v)
                    _axpy_(hv, shift, v)
                    return hv

                shifted.meter = meter
                values, vectors, reason, residual = _power(shifted, *args)
                values = [v - shift for v in values]
        info = meter.close(reason, f": relative residual {residual:.2g} (tol {tol:g})", residual=residual)
    key = (lambda i: -values[i]) if which == "largest" else (lambda i: -abs(values[i]))
    order = sorted(range(len(values)), key=key)
    values, vectors = [values[i] for i in order], [vectors[i] for i in order]
    out = (values,) + ((vectors,) if return_vectors else ()) + ((info,) if return_info else ())
    return out[0] if len(out) == 1 else out


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
    """(values, vectors, why it stopped, largest relative residual)."""
    values, vectors, residuals, reason = [], [], [], "converged"
    for _ in range(k):
        v = _like(ps, lambda shape: torch.randn(shape, generator=gen))
        _orthogonalise_(v, vectors)
        v = _unit(v)
        value, relative = 0.0, math.inf
        for i in range(iters):
            hv = hvp(v)
            _orthogonalise_(hv, vectors)  # deflation: the operator restricted to the complement of the found vectors
            value = _dot(v, hv).item()  # Rayleigh quotient of the unit vector v
            residual = [h - value * x for h, x in zip(hv, v)]
            scale = max(abs(values[0]) if values else abs(value), 1e-30)
            relative = _norm(residual).item() / scale
            nxt = _unit(hv)
            if relative <= tol or nxt is None:
                break
            if i == iters - 1:
                reason = "iters"
                break
            if hvp.meter.out_of_time():  # one product per eigenvalue at least
                break
            v = nxt
        values.append(value)
        vectors.append(v)
        residuals.append(relative)
    return values, vectors, reason, max(residuals)


def _lanczos(hvp, ps, k, iters, tol, gen, n, which="magnitude"):
    """(values, vectors, why it stopped, largest relative residual of the k Ritz pairs)."""
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
        relative = residuals.max().item() / scale
        reason = "converged"
        if len(alphas) >= k and (residuals <= tol * scale).all():
            break
        if beta <= 1e-10 * scale:
            break  # invariant subspace found
        if j == m - 1:
            reason = "iters"
            break  # the budget is spent
        if hvp.meter.out_of_time():
            break
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
    return values, vectors, reason, relative


def hessian_eigenvalues_by_group(model, batches, groups=None, *, iters=50, tol=1e-3, seed=0, method="lanczos",
                                 which="magnitude", train_mode=False, max_seconds=None, progress=None,
                                 return_info=False):
    """Top eigenvalue (largest magnitude, signed; or the largest with which="largest") of each diagonal
    block of the Hessian.

    groups: {label: [parameter names]}; default one group per module that holds trainable parameters
    (its weight and bias together). Cost: the products of `hessian_eigenvalues` once per group
    (a product w.r.t. a block still runs the whole forward and backward), so per-layer results cost
    the number of groups times a top eigenvalue. max_seconds is shared out: each group gets the time
    left over the groups left. return_info=True also returns {label: hessian_eigenvalues' report}.
    """
    max_seconds = _check_budget(max_seconds, progress)
    model = unwrap_model(model, peft=False)
    if groups is None:
        groups = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                groups.setdefault(name.rpartition(".")[0] or name, []).append(name)
    batches = list(batches)
    deadline = None if max_seconds is None else _clock() + max_seconds
    values, infos = {}, {}
    for i, (label, names) in enumerate(groups.items()):
        values[label], info = hessian_eigenvalues(model, batches, 1, params=names, iters=iters, tol=tol, seed=seed,
                                                  method=method, which=which, train_mode=train_mode,
                                                  max_seconds=_share(deadline, len(groups) - i),
                                                  progress=progress, return_info=True)
        values[label], infos[label] = values[label][0], info
    return (values, infos) if return_info else values


def _share(deadline, parts_left):
    """The seconds left before `deadline`, divided over the parts left (None: no deadline). Never 0: a part
    always does its minimum of work."""
    if deadline is None:
        return None
    return max((deadline - _clock()) / parts_left, 1e-3)


# -----------------------------------------------------------------------------
# Hessian trace


def hessian_trace(model, batches, *, samples=100, params=None, seed=0, method="hutchinson", train_mode=False,
                  return_stderr=False, max_seconds=None, progress=None, return_info=False):
    """Tr(H) by Hutchinson's estimator, mean over `samples` Rademacher z of z^T H z (one product each).

    return_stderr=True returns (trace, standard error), the standard error being the sample standard
    deviation of z^T H z over sqrt(samples). method="hutchpp" is Hutch++ (Meyer et al. 2021): a third
    of the products sketch the top of the spectrum (Q = orth(H S)), its trace is taken exactly
    (Tr(Q^T H Q)), and the rest is Hutchinson on the remainder (I - QQ^T) H (I - QQ^T); the standard
    error is the remainder's. Hutch++ holds samples/3 parameter-sized vectors in memory.
    max_seconds: no sample is started that would overrun it (at least 2 are taken; Hutch++'s sketch is
    always completed); the estimate is then the mean of the samples taken, with their standard error,
    and a warning says how many. Cost estimate and progress bar as in `hessian_eigenvalues`.
    return_info=True also returns (last) {"stopped": "samples" | "max_seconds", "samples" (taken),
    "stderr", "products", "passes", "seconds"}.
    """
    if method not in ("hutchinson", "hutchpp"):
        raise ValueError(f"method={method!r}: choose 'hutchinson' or 'hutchpp'.")
    samples = int(samples)
    if samples < (3 if method == "hutchpp" else 2):
        raise ValueError(f"samples={samples}: need at least 2 (3 for hutchpp) to estimate a standard error.")
    max_seconds = _check_budget(max_seconds, progress)
    model = unwrap_model(model, peft=False)
    named = _select(model, params)
    ps = [p for _, p in named]
    gen = _gen(seed)

    def rademacher():
        return _like(ps, lambda shape: torch.randint(0, 2, shape, generator=gen).float() * 2 - 1)

    with _measuring(model, named, train_mode):
        hvp = _HVP(model, batches, ps)
        sketch = samples // 3 if method == "hutchpp" else 0
        remainder = samples - 2 * sketch
        meter = hvp.metered(f"hessian_trace ({method}, {samples} samples)", 2 * sketch + remainder, max_seconds,
                            progress, minimum=2 * sketch + 2)
        exact, basis = 0.0, []
        if method == "hutchpp":
            for _ in range(sketch):
                y = hvp(rademacher())
                for _ in range(2):
                    _orthogonalise_(y, basis)
                y = _unit(y)
                if y is not None:
                    basis.append(y)
            for q in basis:
                exact += _dot(q, hvp(q)).item()
        values = []
        for _ in range(remainder):
            if len(values) >= 2 and meter.out_of_time():
                break
            z = rademacher()
            _orthogonalise_(z, basis)  # (I - QQ^T) z
            hz = hvp(z)
            values.append(_dot(z, hz).item())
        mean = sum(values) / len(values)
        var = sum((x - mean) ** 2 for x in values) / (len(values) - 1)
        trace, stderr = exact + mean, math.sqrt(var / len(values))
        info = meter.close("samples", f": trace {trace:.4g} +- {stderr:.2g} from {len(values)} of {remainder} "
                           "samples", samples=len(values), stderr=stderr)
    out = (trace,) + ((stderr,) if return_stderr else ()) + ((info,) if return_info else ())
    return out[0] if len(out) == 1 else out


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
                seed=0, train_mode=False, eps=1e-12, max_seconds=None, progress=None, return_info=False):
    """Mean over chunks of m samples of L_chunk(w + e) - L_chunk(w).

    kind="worst" (Foret et al. 2021): e = rho T^2 g / ||T g|| from the chunk's own gradient g at w,
    T = |w| + eta for tensors whose name ends in "weight" when adaptive (ASAM, Kwon et al. 2021),
    T = 1 otherwise; steps > 1: projected normalised ascent in delta = T^-1 e (step rho, back onto
    ||delta|| <= rho after each step), the largest loss seen counts (Andriushchenko et al. 2023).
    kind="average": e = rho T z / ||z|| for a standard Gaussian z, averaged over `steps` directions.
    m=None: each batch is one chunk. A batch whose size is not a multiple of m ends in a smaller chunk.
    Cost per chunk: worst, (1 + steps) forward and `steps` backward passes (the last step needs no
    backward); average, 1 + steps forwards and no backward.
    max_seconds: no chunk is started that would overrun it (at least one is measured); the value is then
    the mean over the chunks measured, and a warning says how many. Cost estimate and progress bar as in
    `hessian_eigenvalues`. return_info=True also returns {"stopped": "chunks" | "max_seconds", "chunks"
    (measured, all ranks), "stderr" (of the mean over chunks), "passes", "seconds"}.
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
    max_seconds = _check_budget(max_seconds, progress)
    model = unwrap_model(model, peft=False)
    named = _select(model, params)
    names, ps = [n for n, _ in named], [p for _, p in named]
    device = ps[0].device
    gen = _gen(seed)
    chunks = [c for batch in batches for c in split_batch(batch, None if m is None else int(m))]
    passes = 1 + int(steps) if kind == "average" else 2 * int(steps) + 1
    total = torch.zeros(3, dtype=torch.float64, device=device)  # [sum of increases, number of chunks, sum of squares]
    with _measuring(model, named, train_mode, moves_weights=True) as w0:
        # the chunks are this rank's own (no collective until the end): each rank keeps its own time
        meter = _Meter(f"m_sharpness ({kind}, {len(chunks)} chunks)", len(chunks), "chunk", passes, max_seconds,
                       progress, device=device, sync=False)
        scale = ops.adaptive_weights(w0, names, eta) if adaptive else [None] * len(ps)
        T = [t.float() if t is not None else None for t in scale]

        def tmul(xs):  # T x (T = 1 where None)
            return [x * t if t is not None else x for x, t in zip(xs, T)]

        def move_to(delta):  # w = w0 + T delta
            e = tmul(delta)
            with torch.no_grad():
                for p, w, x in zip(ps, w0, e):
                    p.copy_(w + x.to(p.dtype))

        for chunk in chunks:
            if meter.out_of_time():
                break
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
                increase = sum(losses) / len(losses) - base
                total += torch.tensor([increase, 1.0, increase ** 2], dtype=torch.float64, device=device)
                meter.tick()
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
            total += torch.tensor([increase, 1.0, increase ** 2], dtype=torch.float64, device=device)
            meter.tick()
        _allreduce_sum_([total])
        count = total[1].item()
        if count == 0:
            raise ValueError("batches is empty: pass at least one batch (dict) to measure on.")
        value = (total[0] / count).item()
        var = max(total[2].item() - count * value ** 2, 0.0) / (count - 1) if count > 1 else math.nan
        stderr = math.sqrt(var / count)
        info = meter.close("chunks", f": {value:.4g} +- {stderr:.2g} from {meter.done} of {len(chunks)} chunks",
                           stderr=stderr, chunks=int(count))
    return (value, info) if return_info else value


# -----------------------------------------------------------------------------
# The Trainer callback


def first_samples(batches, n):
    """The batches cut to their first n examples in all (every tensor with a batch dimension sliced along dim 0)."""
    if n is None:
        return list(batches)
    out, left = [], int(n)
    for batch in batches:
        if left <= 0:
            break
        sizes = [v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0]
        size = sizes[0] if sizes else 1
        if size > left:
            batch = {k: v[:left] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
        out.append(batch)
        left -= min(size, left)
    return out


class SharpnessCallback(TrainerCallback):
    """Measure sharpness on a fixed held-out set during training and log it beside the loss.

    Logs `sharpness/top_eigenvalue` (lambda_max, the largest Hessian eigenvalue), `sharpness/trace`,
    `sharpness/m_sharpness` (those in `measures`)
    through `trainer.log`, so they reach `trainer_state.json`'s log_history and every reporting
    integration (TensorBoard, W&B, ...). Works with any Trainer (stock `Trainer`, `SAMTrainer`, ...):

        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=valid)
        SharpnessCallback.attach(trainer)                          # held-out set: the trainer's eval set
        SharpnessCallback.attach(trainer, eval_batches=batches)    # or a list of dicts
        SharpnessCallback.attach(trainer, eval_dataset=ds, data_collator=collate, every=100)

    every: "eval" (after each evaluation; an error at the start of training if the run never evaluates)
    or a number of optimizer steps. The held-out batches are drawn once and reused: `eval_batches` (a
    list of dicts, used as given), else the first `max_batches` batches of `eval_dataset` (with
    `data_collator`, `batch_size`), else of the trainer's eval dataloader; drawn batches are cut to
    `max_samples` examples in all (default 64: the cost follows the model, not the eval batch size).
    Under DDP every rank measures its share (eval_batches: what each rank was given; a dataset: every
    world_size-th batch; max_samples / world_size examples each) and the logged value is the mean over
    all of them.

    Cost of one measurement at the defaults, with B held-out batches (B <= 4, 64 examples in all): the
    top eigenvalue at most iters=20 Hessian-vector products (60 B passes), the trace samples=10 products
    (30 B passes), m-sharpness one chunk per batch (3 B passes); a pass is one forward or one backward
    over one batch. max_seconds caps a whole measurement (shared out over the measures; each still does
    its minimum: k products, 2 samples, 1 chunk); `reports` holds, per measurement, what each measure
    did (products, samples, stderr, why it stopped), `seconds` the duration of each. progress: the
    functions' progress bar (None: on a terminal, for measurements over LONG_SECONDS).

    A measurement changes nothing about training: weights, `.grad`, train/eval flags and buffers are
    put back, and so is every random-number state it can touch (`preserved_rng`), so a run with the
    callback is bit-identical to one without; the Trainer's own log entries are kept.
    Without a trainer (passed in `callbacks=[...]` only) the values go to state.log_history alone.
    """

    def __init__(self, eval_batches=None, *, eval_dataset=None, data_collator=None, batch_size=32, max_batches=4,
                 max_samples=64, every="eval", measures=MEASURES, rho=0.05, m=None, adaptive=False, eta=0.01,
                 steps=1, iters=20, tol=1e-3, samples=10, params=None, seed=0, max_seconds=None, progress=None,
                 trainer=None):
        measures = (measures,) if isinstance(measures, str) else tuple(measures)
        unknown = [x for x in measures if x not in MEASURES]
        if unknown or not measures:
            raise ValueError(f"measures={list(measures)}: choose among {', '.join(MEASURES)}.")
        if not (every == "eval" or (isinstance(every, int) and not isinstance(every, bool) and every > 0)):
            raise ValueError(f"every={every!r}: 'eval' or a positive number of steps.")
        if eval_dataset is not None and eval_batches is not None:
            raise ValueError("give eval_batches or eval_dataset, not both.")
        for name, value in (("max_batches", max_batches), ("max_samples", max_samples)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r}: a positive integer, or None (no limit).")
        self.max_seconds = _check_budget(max_seconds, progress)
        self.measures, self.every, self.trainer = measures, every, trainer
        self.eval_batches, self.eval_dataset, self.data_collator = eval_batches, eval_dataset, data_collator
        self.batch_size, self.max_batches, self.max_samples = batch_size, max_batches, max_samples
        self.settings = dict(rho=rho, m=m, adaptive=adaptive, eta=eta, steps=steps, iters=iters, tol=tol,
                             samples=samples, params=params, seed=seed)
        self.progress = progress
        self._batches = None
        self._warned = False
        self._last_step = None
        self.seconds = []
        self.reports = []

    @classmethod
    def attach(cls, trainer, **kwargs):
        """Build the callback for `trainer` (it logs through trainer.log) and add it to the trainer."""
        callback = cls(trainer=trainer, **kwargs)
        trainer.add_callback(callback)
        return callback

    # ---- events (one measurement per optimizer step at most: several eval sets, or an evaluate()
    # call right after the last epoch's evaluation, measure the same weights) ----
    def on_train_begin(self, args, state, control, **kwargs):
        if self.every == "eval" and str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "no":
            raise ValueError(
                "SharpnessCallback(every='eval') measures after each evaluation, but this run has "
                "eval_strategy='no' and never evaluates while training, so nothing would be measured. Set "
                "eval_strategy='steps' (with eval_steps) or 'epoch' with an eval_dataset, or measure every N "
                "optimizer steps with SharpnessCallback(every=N).")

    def on_evaluate(self, args, state, control, model=None, eval_dataloader=None, **kwargs):
        if self.every == "eval" and state.global_step != self._last_step:
            self._log(state, control, self.measure(model, eval_dataloader))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every != "eval" and state.global_step % self.every == 0 and state.global_step != self._last_step:
            self._log(state, control, self.measure(model))

    # ---- work ----
    def held_out_batches(self, eval_dataloader=None):
        """The fixed batches measured on (this rank's share), drawn on first use."""
        if self._batches is None:
            from itertools import islice

            world = _world()
            rank = _rank()
            limit = None if self.max_samples is None else math.ceil(self.max_samples / world)
            if self.eval_batches is not None:
                batches = list(self.eval_batches)
            elif self.eval_dataset is not None:
                loader = torch.utils.data.DataLoader(self.eval_dataset, batch_size=self.batch_size, shuffle=False,
                                                     collate_fn=self.data_collator)
                many = None if self.max_batches is None else self.max_batches * world
                with preserved_rng(loader):
                    batches = first_samples(list(islice(loader, many))[rank::world], limit)
            else:
                if self.trainer is not None and getattr(self.trainer, "eval_dataset", None) is not None:
                    eval_dataloader = self.trainer.get_eval_dataloader()  # already sharded per rank
                if eval_dataloader is None:
                    raise ValueError("SharpnessCallback has no held-out data: pass eval_batches, eval_dataset "
                                     "(+ data_collator), or attach it to a trainer that has an eval_dataset.")
                with preserved_rng(eval_dataloader):  # a new iterator draws its seed from the global generator
                    batches = first_samples(islice(eval_dataloader, self.max_batches), limit)
            if not batches:
                raise ValueError("SharpnessCallback: the held-out set is empty.")
            self._batches = batches
        return self._batches

    def measure(self, model, eval_dataloader=None):
        """{"sharpness/<measure>": value} for the current weights (every random-number state put back)."""
        if model is None:
            model = self.trainer.model
        s = self.settings
        start = _clock()
        deadline = None if self.max_seconds is None else start + self.max_seconds
        budget = dict(progress=self.progress, return_info=True)
        out, report = {}, {}
        with preserved_rng(*([eval_dataloader] if eval_dataloader is not None else [])):
            batches = self.held_out_batches(eval_dataloader)
            for i, name in enumerate(self.measures):
                left = _share(deadline, len(self.measures) - i)
                if name == "top_eigenvalue":
                    values, report[name] = hessian_eigenvalues(
                        model, batches, 1, params=s["params"], iters=s["iters"], tol=s["tol"], seed=s["seed"],
                        which="largest", max_seconds=left, **budget)
                    out["sharpness/top_eigenvalue"] = values[0]
                elif name == "trace":
                    out["sharpness/trace"], report[name] = hessian_trace(
                        model, batches, samples=s["samples"], params=s["params"], seed=s["seed"], max_seconds=left,
                        **budget)
                else:
                    out["sharpness/m_sharpness"], report[name] = m_sharpness(
                        model, batches, s["rho"], m=s["m"], adaptive=s["adaptive"], eta=s["eta"],
                        params=s["params"], steps=s["steps"], seed=s["seed"], max_seconds=left, **budget)
        self.seconds.append(_clock() - start)
        self.reports.append(report)
        return {k: out[k] for k in (f"sharpness/{x}" for x in MEASURES) if k in out}

    def _log(self, state, control, values):
        self._last_step = state.global_step
        if self.trainer is not None:
            # trainer.log runs on_log, which clears control.should_log: put it back, or the Trainer would skip
            # the training-loss entry it was about to write for this step
            should_log = control.should_log
            self.trainer.log(dict(values))
            control.should_log = should_log
            self.trainer.control.should_log = should_log
            return
        state.log_history.append({**values, "epoch": state.epoch, "step": state.global_step})
        if not self._warned:
            self._warned = True
            warnings.warn("SharpnessCallback without a trainer writes to trainer_state.json only; use "
                          "SharpnessCallback.attach(trainer, ...) (or trainer=) so TensorBoard/W&B see the values.",
                          stacklevel=2)
