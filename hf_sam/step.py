"""The step context: one engine that every front-end drives, one micro-batch at a time.

A variant reads like its paper's algorithm box:

    g = ctx.grad()                      # clean pass at w: per device, no all-reduce
    e = ctx.ascent(g)                   # rho * s * g / ||q g||, selected parameters only
    ctx.grad(at=e, final=True)          # descent pass at w + e, accumulates into .grad

The context owns the mechanics, so no variant repeats them:
- the gradients of earlier micro-batches are set aside (reference swap, no copy) before a
  temporary pass and put back before the final pass, which accumulates exactly as a plain
  backward does;
- temporary passes run without gradient communication (`front.no_sync()`) unless `sync_ascent`;
- weights are moved in place and put back by copy from an exact snapshot, also on error;
- the clean pass's RNG state is replayed in later passes (`same_dropout`), and BatchNorm running
  statistics keep the values of the first pass;
- a non-finite ascent gradient (fp16 overflow) gives no perturbation and is counted; a perturbed
  pass whose loss or gradient is not finite while the clean pass was finite does not reach `.grad`
  (that micro-batch's descent gradient is dropped and counted, see `grad`);
- metric sums stay on the device.

What runs one forward+backward is the *front-end* (the pass-runner seam): `TrainerFrontEnd`
(hf_sam.trainer) calls the stock `Trainer.training_step`; `ClosureFrontEnd` (hf_sam.optim) calls
the user's closure. A front-end provides:

    run(loss_hook, keep) -> loss   one forward+backward into p.grad; keep=False: leave no trace in
                                   the host's own bookkeeping (metrics recorded during the pass)
    no_sync()                      context without gradient communication
    trainer, model, inputs, num_items_in_batch, optimizer, global_step, max_steps, epoch, seed,
    process_index, num_processes, sync_gradients, accumulation_steps, scaler, flags

Lists of per-parameter tensors are aligned with `ctx.params` (every trainable parameter the
optimizer updates); None entries mean "nothing for this parameter".

Sharding is a strategy the front-end hands to the context (`StepContext(..., sharding=)`): the
context asks it for the context each pass runs in, for the descent with an explicit gradient,
whether gradients are global already, and to release what it holds when the micro-batch ends.
`Replicated` (one process or DDP) is the default; hf_sam.sharded has FSDP2 and DeepSpeed. A
strategy works through the context's public operations (`use_params`, `discard_move`,
`move_to_w`, `scratch`), never its private state; this module imports no backend.

What a variant may call directly (so that it stays correct on sharded tensors, FSDP2's DTensors):
elementwise operations on lists aligned with ctx.params (`torch._foreach_add_/mul_/...`, an
elementwise op on one entry); every reduction across parameters (norms, inner products) goes
through `hf_sam.ops` (`global_norm`, `global_dot`), every collective through the context
(`ctx.mean_over_processes`). tests/test_architecture.py holds the variants to this rule.
"""

import math
import warnings
from contextlib import contextmanager, nullcontext

import torch

from . import ops
from .params import select_parameters
from .scaling import layer_factors


class Selection:
    """What a run perturbs, computed once: all trainable params, which are perturbed, their factors."""

    def __init__(self, params, names, selected, s=None, q=None, batchnorms=(), named_order=None):
        self.params = params
        self.names = names
        self.selected = selected
        self.s = s  # numerator factor per param (None: all 1)
        self.q = q  # norm weight per param (None: all 1)
        self.batchnorms = list(batchnorms)  # running-stat buffers of BatchNorm modules
        # indices of params in model.named_parameters() order (the order noise is drawn in; without a
        # model, the optimizer's order)
        self.named_order = list(range(len(params))) if named_order is None else list(named_order)
        # computed once, read every step (no per-parameter Python in the hot path)
        self.selected_idx = [i for i, keep in enumerate(self.selected) if keep]
        self.selected_params = [params[i] for i in self.selected_idx]
        self.selected_s = None if s is None else [s[i] for i in self.selected_idx]
        self.selected_q = None if q is None else [q[i] for i in self.selected_idx]
        self.selected_set = frozenset(self.selected_idx)
        self.cache = {}  # what a variant derives once per run from the model (flat_lora: its LoRA layers)

    @property
    def selected_names(self) -> list[str]:
        return [n for n, keep in zip(self.names, self.selected) if keep]


def unique_trainable(param_groups) -> list:
    """The trainable parameters of optimizer param groups, each once, in group order."""
    params, seen = [], set()
    for group in param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def build_selection(model, params, config, names=None) -> Selection:
    """Selection for `params` (the optimizer's trainable parameters, unique) of `model`.

    Names come from `model.named_parameters()` (matched by identity) or from `names`.
    """
    if names is None:
        name_of = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        names = [name_of.get(id(p), f"<unnamed parameter {i}>") for i, p in enumerate(params)]
    named = list(zip(names, params))
    chosen = set(select_parameters(model, named, config))
    selected = [n in chosen for n in names]
    s = q = None
    factors = layer_factors(model, [np for np, keep in zip(named, selected) if keep], config)
    if factors is not None:
        it_s, it_q = iter(factors[0]), iter(factors[1])
        s = [float(next(it_s)) if keep else 1.0 for keep in selected]
        q = [float(next(it_q)) if keep else 1.0 for keep in selected]
    batchnorms = ops.batchnorm_buffers(ops.batchnorms(model)) if model is not None else []
    position = {id(p): k for k, (_, p) in enumerate(model.named_parameters())} if model is not None else {}
    order = sorted(range(len(params)), key=lambda i: position.get(id(params[i]), len(position) + i))
    return Selection(params, names, selected, s, q, batchnorms, order)


class Replicated:
    """The sharding strategy of a run whose parameters are replicated: one process, or DDP.

    A strategy tells the step context what sharding changes (hf_sam.sharded has FSDP2 and DeepSpeed,
    subclasses of this one). Its methods:

        pass_context(ctx, sync, final)  the context manager one pass runs in
        descend(ctx, d) -> bool         finish the micro-batch with an explicit descent gradient d
                                        where sharding needs it (False: the step adds d to .grad)
        grads_are_global(ctx) -> bool   set_final's d is already the mean over processes
        release(ctx)                    the micro-batch ends (also on error): drop what it holds
        trainable(model)                the parameters the variants work on (None: the optimizer's)
        state_to_save(state) / state_loaded(state, optimizer)   the variant state in checkpoints

    Per-micro-batch state goes in `ctx.scratch`; per-run state on the strategy object itself, which
    the front-end keeps (SAMTrainer: `trainer._sam.sharding`).
    """

    kind = None  # "fsdp2", "deepspeed" in hf_sam.sharded
    sync_ascent_auto = False  # sync_ascent was left unset and the backend chose global ascent

    def pass_context(self, ctx, sync, final):
        """DDP: a per-device temporary pass runs under no_sync; a global-ascent one is synced."""
        if final:
            return nullcontext()
        return _ddp_synced(ctx.model) if sync else ctx.no_sync()

    def descend(self, ctx, d) -> bool:
        return False

    def grads_are_global(self, ctx) -> bool:
        return False

    def release(self, ctx) -> None:
        return None

    def weights_moved(self, ctx) -> None:
        """The selected weights were moved outside a pass (`ctx.move_to`): nothing to do here."""
        return None

    def trainable(self, model):
        return None

    def state_to_save(self, state):
        return state

    def state_loaded(self, state, optimizer):
        return state


REPLICATED = Replicated()


@contextmanager
def _ddp_synced(model):
    """A global-ascent pass under DDP also on a non-final micro-batch, where the Trainer's no_sync is active."""
    if not hasattr(model, "require_backward_grad_sync"):
        yield
        return
    before = model.require_backward_grad_sync
    model.require_backward_grad_sync = True  # read in the forward: covers forward and backward
    try:
        yield
    finally:
        model.require_backward_grad_sync = before


class Metrics:
    """Sums of the SAM metrics since the last log, with no host sync per step.

    A tensor value is summed on the device (one in-place add; the first one of a key is copied); a
    Python number (a count, or a value the step already holds on the host: a CPU step reads its norms,
    which syncs nothing) is summed on the host. `vector()` joins both at log time.
    """

    KEYS = ("sharpness", "windows", "grad_norm", "perturbation_norm", "ascents", "skipped")

    def __init__(self, device):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    def reset(self):
        self._device_sums = {}  # key -> 0-dim fp32 tensor on self.device
        self._host_sums = dict.fromkeys(self.KEYS, 0.0)

    @property
    def sums(self) -> dict:
        """Every key's sum as a 0-dim fp32 tensor on the device (not for the hot path)."""
        return dict(zip(self.KEYS, self.vector().unbind()))

    def add(self, key, value):
        if not torch.is_tensor(value):
            self._host_sums[key] += float(value)
            return
        value = ops.plain(value)  # a replicated DTensor (FSDP) counts once
        if value.requires_grad:
            value = value.detach()
        total = self._device_sums.get(key)
        if total is None:
            self._device_sums[key] = value.to(device=self.device, dtype=torch.float32, copy=True).reshape(())
        else:
            total.add_(value if value.device == self.device else value.to(self.device))

    def means(self, totals: dict) -> dict[str, float]:
        """The logged values (`sam/<name>`) from summed totals (reduced across processes by the caller)."""
        out = {}
        if totals["windows"] > 0:
            out["sam/sharpness"] = totals["sharpness"] / totals["windows"]
        if totals["ascents"] > 0:
            out["sam/grad_norm"] = totals["grad_norm"] / totals["ascents"]
            out["sam/perturbation_norm"] = totals["perturbation_norm"] / totals["ascents"]
        if totals["ascents"] > 0 or totals["skipped"] > 0:
            out["sam/skipped"] = totals["skipped"]
        return out

    def vector(self) -> torch.Tensor:
        host = torch.tensor([self._host_sums[k] for k in self.KEYS], dtype=torch.float32, device=self.device)
        if not self._device_sums:
            return host
        zero = host.new_zeros(())
        return host + torch.stack([self._device_sums.get(k, zero) for k in self.KEYS])


class StepContext:
    """One micro-batch of a sharpness-aware step (see the module docstring).

    Public state: front, trainer, model, inputs, num_items_in_batch, config, selection, names,
    state (the variant's persistent state, saved with checkpoints), metrics, sharding (the
    strategy), scratch (a dict for this micro-batch only: variants and the sharding strategy keep
    what they compute once per micro-batch there), passes, clean_loss, perturbed_loss, last_loss.
    `params` are the tensors the step works on: the optimizer's (sharded) parameters, or what the
    sharding strategy set with `use_params` (FSDP2's unsharded parameters of a per-device ascent).
    """

    def __init__(self, front, config, selection, state, metrics, sharding=None):
        self.front = front
        self.trainer = front.trainer  # None outside the Trainer (hf_sam.SAM)
        self.model = front.model
        self.inputs = front.inputs
        self.num_items_in_batch = front.num_items_in_batch
        self.config = config
        self.selection = selection
        self.params = selection.params
        self.names = selection.names
        self.state = state  # the variant's persistent state (saved with checkpoints)
        self.metrics = metrics
        self.sharding = REPLICATED if sharding is None else sharding
        self.scratch = {}  # per micro-batch: what variants and the sharding strategy compute once
        self.passes = 0
        self.clean_loss = None  # L(w) of this micro-batch, scaled as the front-end scales it
        self.perturbed_loss = None  # loss of the first pass away from w
        self.last_loss = None
        self.final_done = False
        self._kept = False  # a pass whose host bookkeeping is kept has run (the first at w)
        self._clean_grads = None  # the list returned by the first pass at w
        self._clean_grad_ok = None  # device bool: that gradient was finite (set by ascent)
        self._stash = None
        self._saved = None  # exact copies of the selected parameters, taken on the first move
        self._saved_idx = None
        self._moved = False
        self._rng = None
        self._bn_saved = None
        self.single_pass = False  # set by run_step from the variant's declared passes (see _save_rng)

    # ---- where the step is (read by variants; the same for every front-end) ------------------
    @property
    def optimizer(self):
        """The optimizer that updates ctx.params (its `.state` holds e.g. Adam's moments)."""
        return self.front.optimizer

    @property
    def global_step(self) -> int:
        return int(self.front.global_step)

    @property
    def max_steps(self) -> int:
        return int(self.front.max_steps or 0)

    @property
    def epoch(self) -> float:
        return float(self.front.epoch or 0.0)

    @property
    def seed(self) -> int:
        return int(self.front.seed)

    @property
    def process_index(self) -> int:
        return int(self.front.process_index)

    @property
    def num_processes(self) -> int:
        return int(self.front.num_processes)

    @property
    def accumulation_steps(self) -> int:
        return int(self.front.accumulation_steps or 1)

    def no_sync(self):
        """A context in which a backward does not communicate gradients (per-device passes)."""
        return self.front.no_sync()

    # ---- passes ------------------------------------------------------------------------------
    def grad(self, at=None, final=False, loss_hook=None, release=False, only=None):
        """One forward+backward pass at w + at (at=None: at w).

        Temporary pass (final=False): returns the gradients (aligned with ctx.params) and leaves
        `.grad` as it was. Final pass: accumulates into `.grad` like a plain backward; returns the loss.
        loss_hook(compute, model, inputs, num_items_in_batch) -> (loss, outputs) wraps the loss
            computation of this pass (per-sample losses, extra loss terms); Trainer front-end only.
        release: empty the list `at` once the weights have moved, so its tensors are freed before the
            pass runs (the weights come back from the snapshot, not from `at`): plain SAM then holds
            one parameter-sized buffer beyond the stock step.
        only: (temporary pass) the indices of ctx.params that need a gradient; the others get None.
            They have requires_grad off during the pass, which saves their backward (ESAM), unless
            the pass communicates (sync_ascent on several processes: DDP reduces every gradient),
            where they are computed and dropped.

        Non-finite guard (final pass away from w): when the pass's backward does not communicate
        (one process, or a non-final micro-batch of an accumulation window) and no fp16 GradScaler
        is in use, the descent gradient is checked on the device before it joins `.grad`; if it or
        the loss is not finite while the clean loss was finite, this micro-batch's descent gradient
        is dropped (the micro-batch adds nothing to the step) and counted in `sam/skipped`.
        """
        if self.final_done:
            raise RuntimeError("the final pass of this micro-batch has already run")
        self._position(at)
        if release and at is not None:
            at[:] = [None] * len(at)
        if final:
            guard = at is not None and self._guard_allowed(communicates=self._final_communicates())
            if guard:
                self._stash_grads()
            else:
                self._unstash()
            loss = self._run_pass(sync=True, loss_hook=loss_hook, keep=not self._kept, final=True)
            if guard:
                self._drop_nonfinite([p.grad for p in self.params], loss)
                self._unstash(add=True)
            self.final_done = True
            self._record_loss(loss, at)
            return loss
        self._stash_grads()
        with self._gradients_only(only):
            loss = self._run_pass(sync=self.config.sync_ascent, loss_hook=loss_hook,
                                  keep=at is None and not self._kept)
        grads = [p.grad for p in self.params]
        if at is None and not self._kept:
            self._kept, self._clean_grads = True, grads
        for p in self.params:
            p.grad = None
        self._record_loss(loss, at)
        if only is not None:
            grads = [x if i in only else None for i, x in enumerate(grads)]
        return grads

    def set_final(self, d):
        """Finish the micro-batch with an explicit descent gradient d (aligned with ctx.params).

        `.grad` becomes earlier micro-batches' gradients + d, and on the synchronising micro-batch of
        a multi-process run it is averaged across processes, as DDP would have done. A non-finite d
        after a finite clean pass is dropped and counted (as in `grad`).
        """
        if self.final_done:
            raise RuntimeError("the final pass of this micro-batch has already run")
        self._position(None)
        if self._guard_allowed(communicates=False):
            self._drop_nonfinite(d, self.last_loss)
        self._unstash()
        if self.sharding.descend(self, d):  # DeepSpeed: d goes through the engine's backward and step
            self.final_done = True
            return
        with torch.no_grad():
            add_to = [(p, x) for p, x in zip(self.params, d) if x is not None and p.grad is not None]
            if add_to:
                torch._foreach_add_([p.grad for p, _ in add_to], [x for _, x in add_to])
            for p, x in zip(self.params, d):
                if x is not None and p.grad is None:
                    p.grad = x.detach()
            front = self.front
            if front.num_processes > 1 and front.sync_gradients and torch.distributed.is_initialized() \
                    and not self.sharding.grads_are_global(self):
                for p in self.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                ops.all_mean_([p.grad for p in self.params], front.num_processes)
        self.final_done = True

    # ---- the ascent ----------------------------------------------------------------------------
    def ascent(self, g, rho=None, inplace=False):
        """e = rho * s * T^2 g / (sqrt(sum_k (q_k ||T_k g_k||)^2) + eps) on the selected parameters.

        T = |w| + eta for tensors named *weight when the ascent is adaptive (ASAM), else 1; s and q
        come from `rho_scaling` (1 without). The norm is global and in fp32. A non-finite norm
        (overflow) gives e = 0 and counts a skip. With inplace=True, g's storage is reused for e.
        Returns a list aligned with ctx.params (None for parameters that are not perturbed).
        """
        rho = self.config.rho if rho is None else rho
        sel = self.selection
        idx = [i for i in sel.selected_idx if g[i] is not None]
        out = [None] * len(self.params)
        if not idx:
            self._warn_no_grads()
            return out
        if len(idx) == len(sel.selected_idx):
            s, q = sel.selected_s, sel.selected_q
        else:
            s = [sel.s[i] for i in idx] if sel.s is not None else None
            q = [sel.q[i] for i in idx] if sel.q is not None else None
        gs = [g[i] for i in idx]
        clean = g is self._clean_grads
        self._clean_grads = None  # hold no reference: the variant may free g (release=True)
        adaptive = self.config.effective_adaptive
        if adaptive:
            grad_norm = ops.global_norm(gs)
            e = gs if inplace else ops.snapshot(gs)
            t = ops.adaptive_weights([self.params[i] for i in idx], [self.names[i] for i in idx], self.config.eta)
            ops.mul_where_(e, t)  # T g
            norm = ops.global_norm(e, q)
            ops.mul_where_(e, t)  # T^2 g
            s_norm = None
        else:
            # one read of g for every norm the step needs: ||g||, ||q g|| (the ascent's), ||s g|| (||e|| / scale)
            weightings = [None] + ([q] if q is not None else []) + ([s] if s is not None else [])
            norms = ops.global_norms(gs, weightings)
            grad_norm = norms[0]
            norm = norms[1] if q is not None else grad_norm
            s_norm = norms[-1] if s is not None else grad_norm
            e = gs if inplace else ops.snapshot(gs)
        if _host_read_is_free(norm):
            # a CPU scalar is read without a sync: the scale and the metrics are Python numbers, no device op
            grad_norm, norm = grad_norm.item(), norm.item()
            s_norm = s_norm.item() if s is not None and not adaptive else None
            finite = math.isfinite(norm)  # a finite norm means every g_i, so every e_i, is finite
            scale = rho / (norm + self.config.eps) if finite else 0.0
            if finite:
                ops.scale_(e, scale, s)
            else:
                torch._foreach_zero_(ops.local(e))
            if not finite:
                e_norm = 0.0
            elif adaptive:
                e_norm = ops.global_norm(e)
            else:
                e_norm = abs(scale) * (s_norm if s is not None else grad_norm)
        else:
            finite = torch.isfinite(norm)
            scale = torch.where(finite, rho / (norm + self.config.eps), 0.0)
            ops.scale_(e, scale, s)
            ops.zero_where_(e, ~finite)
            if adaptive:
                e_norm = ops.global_norm(e)
            else:  # ||e|| = |scale| ||s g||, no extra pass
                e_norm = torch.where(finite, scale.abs() * (s_norm if s is not None else grad_norm), 0.0)
        if clean:
            self._clean_grad_ok = finite
        self.metrics.add("grad_norm", grad_norm * self.grad_unit())
        self.metrics.add("perturbation_norm", e_norm)
        self.metrics.add("ascents", 1.0)
        self.metrics.add("skipped", (~finite).float() if torch.is_tensor(finite) else float(not finite))
        for i, x in zip(idx, e):
            out[i] = x
        return out

    # ---- helpers for variants ------------------------------------------------------------------
    def mean_over_processes(self, value):
        """The mean of a tensor over all processes (one all-reduce; `value` itself in one process).

        Every process must call it (a collective). Returns a new tensor on the parameters' device.
        """
        return ops.mean_over_processes(value, self.params[0].device)

    @contextmanager
    def side_pass(self):
        """A block for passes beside the step's own (SSAM's Fisher passes): no gradient communication,
        and the global RNG and BatchNorm statistics are put back afterwards. `.grad` is the caller's
        to leave alone (use torch.autograd.grad)."""
        with ops.isolated(self.selection.batchnorms), self.no_sync():
            yield

    def optimizer_state(self, key):
        """The base optimizer's per-parameter state entry `key`, aligned with ctx.params (None if absent)."""
        state = self.optimizer.state
        return [state.get(p, {}).get(key) for p in self.params]

    def inverse_loss_scale(self):
        """1 / the fp16 GradScaler's current scale (a device tensor, no host sync), or 1.0 without one."""
        scaler = self.front.scaler
        if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
            scale = scaler._get_scale_async()
            if scale is not None:
                return 1.0 / scale.float()
        return 1.0

    def grad_unit(self):
        """Factor turning a backpropagated gradient norm into the micro-batch mean loss's gradient norm."""
        return float(self.accumulation_steps) * self.inverse_loss_scale()

    # ---- for the sharding strategy ---------------------------------------------------------------
    def move_to_w(self):
        """Put the selected weights back at w now (DeepSpeed: just before the engine's step)."""
        self._position(None)

    def move_to(self, at):
        """Put the selected weights at w + at now (at=None: at w, from the exact snapshot); for a side
        measurement inside a pass (rsam's L(w) in the loss hook of its pass at w + delta). The sharding
        strategy is told, so that no stale gathered copy of the old weights serves the next forward."""
        self._position(at)
        self.sharding.weights_moved(self)

    def use_params(self, params=None):
        """Work on `params` from now on (aligned with selection.params; None: the optimizer's own).

        FSDP2's per-device ascent: the unsharded parameters, which hold this device's full gradient.
        """
        self.params = self.selection.params if params is None else list(params)

    def discard_move(self):
        """The moved tensors are gone (FSDP2 dropped the unsharded w + e; the shards never moved):
        forget the snapshot instead of copying it back."""
        self._moved = False
        self._saved = None

    # ---- mechanics -----------------------------------------------------------------------------
    @contextmanager
    def _gradients_only(self, only):
        """requires_grad off for the parameters outside `only` during one temporary pass (see `grad`)."""
        if only is None or (self.config.sync_ascent and self.num_processes > 1):
            yield
            return
        frozen = [p for i, p in enumerate(self.params) if i not in only and p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(False)
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _run_pass(self, sync, loss_hook=None, keep=True, final=False):
        self._clean_grads = None
        if self.passes == 0:
            self._save_rng()
        else:
            self._replay_rng()
            self._save_bn()
        cm = self.sharding.pass_context(self, sync, final)  # DDP: front.no_sync() unless sync
        try:
            with cm:
                loss = self.front.run(loss_hook=loss_hook, keep=keep)
        finally:
            if self.passes > 0:
                self._restore_bn()
            self.passes += 1
        return loss

    def _final_communicates(self) -> bool:
        return self.front.num_processes > 1 and self.front.sync_gradients

    def _guard_allowed(self, communicates: bool) -> bool:
        """Whether a descent gradient can be checked before it joins .grad (see `grad`)."""
        scaler = self.front.scaler
        if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
            return False  # fp16: an overflow is the GradScaler's to skip
        return not communicates

    def _drop_nonfinite(self, grads, loss) -> None:
        """Zero `grads` in place when they (or `loss`) are not finite and the clean loss was finite."""
        present = [x for x in grads if x is not None]
        if not present:
            return
        # one fused read of the gradient and the loss: finite exactly when all of them are
        probe = ops.finiteness_probe(present, [loss] if loss is not None else [])
        if _host_read_is_free(probe):  # read without a sync: the common (finite) case costs nothing more
            if math.isfinite(probe.item()):
                return
            if self.clean_loss is not None and not math.isfinite(self.clean_loss.detach().float().sum().item()):
                return  # the clean pass was not finite either: not this guard's to drop
            if self._clean_grad_ok is not None and not bool(self._clean_grad_ok):
                return
            torch._foreach_zero_(ops.local(present))
            self.metrics.add("skipped", 1.0)
            return
        bad = ~torch.isfinite(probe)
        if self.clean_loss is not None:
            bad = bad & torch.isfinite(self.clean_loss.detach().float().sum())
        if self._clean_grad_ok is not None:
            bad = bad & self._clean_grad_ok
        ops.zero_where_(present, bad)
        self.metrics.add("skipped", bad.float())

    def _record_loss(self, loss, at):
        self.last_loss = loss
        if at is None and self.clean_loss is None:
            self.clean_loss = loss.clone()
        elif at is not None and self.perturbed_loss is None:
            self.perturbed_loss = loss.detach()

    def _position(self, at):
        """Put the selected weights at w (at=None) or w + at; the first move takes the snapshot."""
        if at is None:
            if self._moved:
                ops.restore_(self._saved_params(), self._saved)
                self._moved = False
            return
        idx = [i for i, x in enumerate(at) if x is not None]
        if self._saved is None:
            self._saved_idx = self.selection.selected_idx
            self._saved = ops.snapshot(self._saved_params())
        outside = () if idx == self._saved_idx else set(idx) - self.selection.selected_set
        if outside:
            names = ", ".join(self.names[i] for i in sorted(outside)[:3])
            raise ValueError(f"variant {self.config.variant!r} tried to perturb parameters outside the "
                             f"selection (perturb={self.config.perturb!r}): {names}")
        if self._moved:
            ops.restore_(self._saved_params(), self._saved)
        self._moved = True
        ops.add_([self.params[i] for i in idx], [at[i] for i in idx])

    def _saved_params(self):
        if self.params is self.selection.params:
            return self.selection.selected_params
        return [self.params[i] for i in self._saved_idx]

    def _stash_grads(self):
        if self._stash is None:  # selection.params: the optimizer's (sharded) parameters
            self._stash = [p.grad for p in self.selection.params]
            for p in self.selection.params:
                p.grad = None

    def _unstash(self, add=False):
        """Put earlier micro-batches' gradients back; add=True: add this pass's .grad onto them."""
        if self._stash is None:
            return
        params = self.selection.params  # the optimizer's (sharded) parameters
        if add:
            pairs = [(s, p.grad) for s, p in zip(self._stash, params) if s is not None and p.grad is not None]
            if pairs:
                with torch.no_grad():
                    torch._foreach_add_([s for s, _ in pairs], [g for _, g in pairs])
        for p, s in zip(params, self._stash):
            if s is not None or not add:
                p.grad = s
        self._stash = None

    def _save_rng(self):
        """The RNG state before the first pass, for `same_dropout`; skipped when the variant declared a single
        pass (registry `passes=1`: msam, mesa, saf, flat_lora; or `one_pass_now` says so for this micro-batch:
        looksam between refreshes), which has no later pass to replay it in."""
        if not self.config.same_dropout or self.single_pass:
            return
        self._rng = ops.rng_state()

    def _replay_rng(self):
        if self._rng is not None:
            ops.set_rng_state(self._rng)
        elif self.single_pass and self.config.same_dropout:
            raise RuntimeError(f"variant {self.config.variant!r} is registered with passes=1 but ran a second pass, "
                               "so same_dropout has no RNG state to replay: register it with its real pass count")

    def _save_bn(self):
        if self.selection.batchnorms and self._bn_saved is None:
            self._bn_saved = ops.snapshot(self.selection.batchnorms)

    def _restore_bn(self):
        if self._bn_saved is not None:
            ops.restore_(self.selection.batchnorms, self._bn_saved)

    def _warn_no_grads(self):
        if "no_grads" not in self.front.flags:
            self.front.flags.add("no_grads")
            warnings.warn("The ascent pass produced no gradient for any perturbed parameter, so no perturbation "
                          "was applied. With PEFT and activation checkpointing call "
                          "model.enable_input_require_grads().", stacklevel=3)

    # ---- end of the micro-batch ------------------------------------------------------------------
    def finish(self):
        """Record the sharpness metric; called by the front-end after the variant returned."""
        if not self.final_done:
            raise RuntimeError(f"variant {self.config.variant!r} returned without a final pass "
                               "(ctx.grad(..., final=True) or ctx.set_final(...))")
        if self.clean_loss is not None and self.perturbed_loss is not None:
            self.metrics.add("sharpness", self.perturbed_loss - self.clean_loss)
            self.metrics.add("windows", 1.0 / self.accumulation_steps)

    def close(self):
        """Always runs: weights back to w by copy, earlier gradients back, buffers freed."""
        self.sharding.release(self)  # FSDP2 per-device ascent: drop the unsharded w + e (the shards never moved)
        try:
            if self._moved:
                ops.restore_(self._saved_params(), self._saved)
                self._moved = False
        finally:
            self._unstash()  # only non-empty when a pass raised
            self._saved = None
            self._bn_saved = None

    def loss(self):
        """The loss the front-end reports: clean L(w) when it was computed, else the final pass's."""
        return self.clean_loss if self.clean_loss is not None else self.last_loss


def _host_read_is_free(t) -> bool:
    """Reading this scalar on the host costs no device sync (a CPU tensor): the step may then branch on it and
    keep its scalars and metrics as Python numbers; on an accelerator it stays on the device."""
    return t.device.type == "cpu"


def sam_active(config, variant, step: int, max_steps) -> bool:
    """Whether optimizer step `step` is sharpness-aware (rho, interval and start/end gates)."""
    if variant.uses_rho and config.rho == 0:
        return False
    if step % config.interval != 0:
        return False
    if (config.start > 0 or config.end < 1) and max_steps:
        if not config.start <= step / max_steps < config.end:
            return False
    return True


def run_step(variant, ctx):
    """Run `variant` on `ctx` for one micro-batch; the weights are back at w whatever happens."""
    one_pass_now = getattr(variant, "one_pass_now", None)  # no RNG snapshot for a pass never replayed
    ctx.single_pass = getattr(variant, "passes", 2) == 1 or bool(one_pass_now is not None and one_pass_now(ctx))
    try:
        variant.step(ctx)
        ctx.finish()
    finally:
        ctx.close()
    return ctx.loss()
