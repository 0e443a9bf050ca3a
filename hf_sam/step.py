"""The step context a variant drives for one micro-batch.

A variant reads like its paper's algorithm box:

    g = ctx.grad()                      # clean pass at w: per device, no all-reduce
    e = ctx.ascent(g)                   # rho * s * g / ||q g||, selected parameters only
    ctx.grad(at=e, final=True)          # descent pass at w + e, accumulates into .grad

The context owns the mechanics, so no variant repeats them:
- the gradients of earlier micro-batches are set aside (reference swap, no copy) before a
  temporary pass and put back before the final pass, which accumulates exactly as the stock
  `Trainer.training_step` does (it *is* the stock training_step: same loss path and scaling);
- temporary passes run under `accelerator.no_sync(model)` (forward and backward) unless
  `sync_ascent=True`;
- weights are moved in place and put back by copy from an exact snapshot, also on error;
- the clean pass's RNG state is replayed in later passes (`same_dropout`), and BatchNorm running
  statistics keep the values of the first pass;
- a non-finite ascent gradient (fp16 overflow) gives no perturbation and is counted;
- metric sums stay on the device.

Lists of per-parameter tensors are aligned with `ctx.params` (every trainable parameter the
optimizer updates); None entries mean "nothing for this parameter".
"""

import warnings

import torch

from . import ops, sharded


class Selection:
    """What a run perturbs, computed once: all trainable params, which are perturbed, their factors."""

    def __init__(self, params, names, selected, s=None, q=None):
        self.params = params
        self.names = names
        self.selected = selected
        self.s = s  # numerator factor per param (None: all 1)
        self.q = q  # norm weight per param (None: all 1)
        self.batchnorms = []  # running-stat buffers of BatchNorm modules, filled by the trainer


class Metrics:
    """On-device sums of the SAM metrics since the last log (no host sync per step)."""

    KEYS = ("sharpness", "windows", "grad_norm", "perturbation_norm", "ascents", "skipped")

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.sums = {k: torch.zeros((), dtype=torch.float32, device=self.device) for k in self.KEYS}

    def add(self, key, value):
        value = ops.plain(value)  # a replicated DTensor (FSDP) counts once
        self.sums[key] += value.detach().to(device=self.device, dtype=torch.float32) \
            if torch.is_tensor(value) else value


class StepContext:
    def __init__(self, trainer, model, inputs, num_items_in_batch, config, selection, state, metrics):
        self.trainer = trainer
        self.model = model
        self.inputs = inputs
        self.num_items_in_batch = num_items_in_batch
        self.config = config
        self.selection = selection
        self.params = selection.params
        self.names = selection.names
        self.state = state  # the variant's persistent state (saved with checkpoints)
        self.metrics = metrics
        self.passes = 0
        self.clean_loss = None  # L(w) of this micro-batch, scaled as the stock Trainer scales it
        self.perturbed_loss = None  # loss of the first pass away from w
        self.last_loss = None
        self.final_done = False
        self._stash = None
        self._saved = None  # exact copies of the selected parameters, taken on the first move
        self._saved_idx = None
        self._moved = False
        self._rng = None
        self._bn_saved = None

    # ---- passes ------------------------------------------------------------------------------
    def grad(self, at=None, final=False, loss_hook=None, release=False):
        """One forward+backward pass at w + at (at=None: at w).

        Temporary pass (final=False): returns the gradients (aligned with ctx.params) and leaves
        `.grad` as it was. Final pass: accumulates into `.grad` like the stock step; returns the loss.
        loss_hook: see SAMTrainer._stock_training_step (per-sample losses, extra loss terms).
        release: empty the list `at` once the weights have moved, so its tensors are freed before the
            pass runs (the weights come back from the snapshot, not from `at`): plain SAM then holds
            one parameter-sized buffer beyond the stock step.
        """
        if self.final_done:
            raise RuntimeError("the final pass of this micro-batch has already run")
        self._position(at)
        if release and at is not None:
            at[:] = [None] * len(at)
        if final:
            self._unstash()
            loss = self._run_pass(sync=True, loss_hook=loss_hook, final=True)
            self.final_done = True
            self._record_loss(loss, at)
            return loss
        self._stash_grads()
        loss = self._run_pass(sync=self.config.sync_ascent, loss_hook=loss_hook)
        grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        self._record_loss(loss, at)
        return grads

    def set_final(self, d):
        """Finish the micro-batch with an explicit descent gradient d (aligned with ctx.params).

        `.grad` becomes earlier micro-batches' gradients + d, and on the synchronising micro-batch of
        a multi-process run it is averaged across processes, as DDP would have done.
        """
        if self.final_done:
            raise RuntimeError("the final pass of this micro-batch has already run")
        self._position(None)
        self._unstash()
        with torch.no_grad():
            add_to = [(p, x) for p, x in zip(self.params, d) if x is not None and p.grad is not None]
            if add_to:
                torch._foreach_add_([p.grad for p, _ in add_to], [x for _, x in add_to])
            for p, x in zip(self.params, d):
                if x is not None and p.grad is None:
                    p.grad = x.detach()
            acc = self.trainer.accelerator
            if acc.num_processes > 1 and acc.sync_gradients and torch.distributed.is_initialized() \
                    and not sharded.grads_are_global(self):
                for p in self.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(acc.num_processes)
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
        idx = [i for i, x in enumerate(g) if x is not None and sel.selected[i]]
        out = [None] * len(self.params)
        if not idx:
            self._warn_no_grads()
            return out
        gs = [g[i] for i in idx]
        ws = [self.params[i] for i in idx]
        s = [sel.s[i] for i in idx] if sel.s is not None else None
        q = [sel.q[i] for i in idx] if sel.q is not None else None
        grad_norm = ops.global_norm(gs)
        e = gs if inplace else ops.snapshot(gs)
        if self.config.effective_adaptive:
            t = ops.adaptive_weights(ws, [self.names[i] for i in idx], self.config.eta)
            ops.mul_where_(e, t)  # T g
            norm = ops.global_norm(e, q)
            ops.mul_where_(e, t)  # T^2 g
        else:
            norm = grad_norm if q is None else ops.global_norm(gs, q)
        scale = ops.finite_or_zero(rho / (norm + self.config.eps), norm)
        ops.scale_(e, scale, s)
        ops.zero_nonfinite_(e)
        self.metrics.add("grad_norm", grad_norm * self.grad_unit())
        self.metrics.add("perturbation_norm", ops.global_norm(e))
        self.metrics.add("ascents", 1.0)
        self.metrics.add("skipped", (~torch.isfinite(norm)).float())
        for i, x in zip(idx, e):
            out[i] = x
        return out

    # ---- helpers for variants ------------------------------------------------------------------
    @property
    def selected_params(self):
        return [p for p, s in zip(self.params, self.selection.selected) if s]

    def optimizer_state(self, key):
        """The base optimizer's per-parameter state entry `key`, aligned with ctx.params (None if absent)."""
        state = self.trainer.optimizer.state
        return [state.get(p, {}).get(key) for p in self.params]

    # ---- mechanics -----------------------------------------------------------------------------
    def _run_pass(self, sync, loss_hook=None, final=False):
        if self.passes == 0:
            self._save_rng()
        else:
            self._replay_rng()
            self._save_bn()
        cm = sharded.pass_context(self, sync, final)  # DDP: no_sync unless sync; FSDP2: see hf_sam.sharded
        try:
            with cm:
                loss = self.trainer._stock_training_step(self.model, self.inputs, self.num_items_in_batch, loss_hook)
        finally:
            if self.passes > 0:
                self._restore_bn()
            self.passes += 1
        return loss

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
            self._saved_idx = [i for i, s in enumerate(self.selection.selected) if s]
            self._saved = ops.snapshot(self._saved_params())
        outside = set(idx) - set(self._saved_idx)
        if outside:
            names = ", ".join(self.names[i] for i in sorted(outside)[:3])
            raise ValueError(f"variant {self.config.variant!r} tried to perturb parameters outside the "
                             f"selection (perturb={self.config.perturb!r}): {names}")
        if self._moved:
            ops.restore_(self._saved_params(), self._saved)
        self._moved = True
        ops.add_([self.params[i] for i in idx], [at[i] for i in idx])

    def _saved_params(self):
        return [self.params[i] for i in self._saved_idx]

    def _stash_grads(self):
        if self._stash is None:  # selection.params: the optimizer's (sharded) parameters
            self._stash = [p.grad for p in self.selection.params]
            for p in self.selection.params:
                p.grad = None

    def _unstash(self):
        if self._stash is not None:
            for p, g in zip(self.selection.params, self._stash):
                p.grad = g
            self._stash = None

    def _save_rng(self):
        if not self.config.same_dropout:
            return
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self._rng = (torch.get_rng_state(), cuda)

    def _replay_rng(self):
        if self._rng is not None:
            torch.set_rng_state(self._rng[0])
            if self._rng[1] is not None:
                torch.cuda.set_rng_state_all(self._rng[1])

    def _save_bn(self):
        if self.selection.batchnorms and self._bn_saved is None:
            self._bn_saved = ops.snapshot(self.selection.batchnorms)

    def _restore_bn(self):
        if self._bn_saved is not None:
            ops.restore_(self.selection.batchnorms, self._bn_saved)

    def inverse_loss_scale(self):
        """1 / the fp16 GradScaler's current scale (a device tensor, no host sync), or 1.0 without one."""
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
            scale = scaler._get_scale_async()
            if scale is not None:
                return 1.0 / scale.float()
        return 1.0

    def grad_unit(self):
        """Factor turning a backpropagated gradient norm into the micro-batch mean loss's gradient norm."""
        unit = float(getattr(self.trainer, "current_gradient_accumulation_steps", 1) or 1)
        return unit * self.inverse_loss_scale()

    def _warn_no_grads(self):
        if not getattr(self.trainer, "_sam_warned_no_grads", False):
            self.trainer._sam_warned_no_grads = True
            warnings.warn("The ascent pass produced no gradient for any perturbed parameter, so no perturbation "
                          "was applied. With PEFT and activation checkpointing call "
                          "model.enable_input_require_grads().", stacklevel=3)

    # ---- end of the micro-batch ------------------------------------------------------------------
    def finish(self):
        """Record the sharpness metric; called by the trainer after the variant returned."""
        if not self.final_done:
            raise RuntimeError(f"variant {self.config.variant!r} returned without a final pass "
                               "(ctx.grad(..., final=True) or ctx.set_final(...))")
        if self.clean_loss is not None and self.perturbed_loss is not None:
            self.metrics.add("sharpness", self.perturbed_loss - self.clean_loss)
            self.metrics.add("windows", 1.0 / float(self.trainer.current_gradient_accumulation_steps or 1))

    def close(self):
        """Always runs: weights back to w by copy, earlier gradients back, buffers freed."""
        sharded.release(self)  # FSDP2 per-device ascent: drop the unsharded w + e (the shards never moved)
        try:
            if self._moved:
                ops.restore_(self._saved_params(), self._saved)
                self._moved = False
        finally:
            self._unstash()  # only non-empty when a pass raised
            self._saved = None
            self._bn_saved = None

    def loss(self):
        """The loss the trainer reports: clean L(w) when it was computed, else the final pass's."""
        return self.clean_loss if self.clean_loss is not None else self.last_loss
