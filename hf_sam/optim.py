"""hf_sam.SAM: the closure front-end of the step engine, for plain PyTorch and `accelerate` loops.

    opt = hf_sam.SAM(model.named_parameters(), torch.optim.AdamW, config=SAMConfig(rho=0.05), lr=1e-3)

    def closure():
        loss = model(**batch).loss
        loss.backward()                  # or accelerator.backward(loss)
        return loss

    loss = opt.step(closure)             # clean pass, ascent, perturbed pass, restore, optimizer step
    opt.zero_grad()

The closure runs one forward+backward into `p.grad`; the step calls it once per pass, so the
registered variants (`SAMConfig.variant`) drive it through the same StepContext as SAMTrainer.
Returns the clean loss L(w).

The closure may clear the gradients itself (torch.optim's documented closure, `opt.zero_grad()`
first; PyTorch Lightning's automatic optimization) or not (clear them after the step): both give
the same update. The step owns `.grad` (see `GradLedger`):
- an optimizer step starts with the first `accumulate(closure)` / `step(closure)` after the previous
  update (or `zero_grad()`): what is then in `.grad` is what that update left (the previous
  step's descent gradient) and is discarded, as a zeroing closure would;
- inside the step, `opt.zero_grad()` called by the closure does nothing: every pass already starts
  from the gradients it must see (none for the ascent, earlier micro-batches' for the last one);
- a gradient written into `.grad` outside the optimizer between two updates (a backward before
  `step(closure)`, e.g. Lightning's `accumulate_grad_batches`) would join the update without SAM:
  the step refuses it with an error, before any pass.

Gradient accumulation: call `opt.accumulate(closure)` for every micro-batch of the window (each
adds its descent gradient to `.grad`; the closure scales its loss as any accumulation loop does,
e.g. by 1 / number of micro-batches) and `opt.step()` without a closure to update; or
`opt.step(closure)` on the last micro-batch.

Wrapped optimizers (`accelerator.prepare(opt)`, Lightning's `self.optimizers()`): the wrapper's
`step(closure)` may drop the returned loss; `SAM.unwrap(opt)` is the hf_sam.SAM inside, whose
`last_loss` and `metrics()` are the step's.

DDP: pass the wrapped model (`SAM(..., model=ddp_model)`, or set `opt.model = ddp_model` after
`accelerator.prepare`): the temporary passes then run under its `no_sync()` (per-device ascent,
no all-reduce, as SAMTrainer does); without it the ascent gradients are all-reduced (global
ascent, the result of `sync_ascent=True`). As in any DDP accumulation loop, wrap the micro-batches
before the last one in `model.no_sync()` yourself.

FSDP2 (`fully_shard` before building the optimizer; HSDP too): detected from the DTensor parameters
or `model=`. The ascent is global by default (sync_ascent=None or True: m = the global batch, sharded
memory, no model= needed); sync_ascent=False is the per-device ascent on unsharded parameters and
needs model=<the fully_shard root>. The variants allowed are hf_sam.sharded.FSDP2_VARIANTS.

fp16: a GradScaler cannot drive a closure optimizer correctly (accelerate passes the closure to
`scaler.step` positionally, the closure's gradients are never unscaled): use bf16 or SAMTrainer.
Variants that need the Trainer (its dataset, loss hooks or callbacks) are refused here.
"""

import warnings
import weakref
from contextlib import nullcontext

import torch

from . import sharded
from .config import SAMConfig
from .step import Metrics, StepContext, build_selection, run_step, sam_active, unique_trainable
from .variants import get_variant


class ClosureFrontEnd:
    """The step engine's pass runner for hf_sam.SAM: one pass = one call of the user's closure."""

    trainer = None
    inputs = None
    num_items_in_batch = None
    epoch = 0.0
    sync_gradients = True
    accumulation_steps = 1
    scaler = None

    def __init__(self, sam, closure):
        self.closure = closure
        self.model = sam.model
        self.optimizer = sam.base_optimizer
        self.global_step = sam.steps
        self.max_steps = sam.max_steps
        self.seed = sam.seed
        self.process_index, self.num_processes = sam._world()
        self.flags = sam._flags

    def no_sync(self):
        model = self.model
        return model.no_sync() if model is not None and hasattr(model, "no_sync") else nullcontext()

    def run(self, loss_hook=None, keep=True):
        if loss_hook is not None:
            raise RuntimeError("this variant computes its own loss terms and needs SAMTrainer")
        with torch.enable_grad():
            loss = self.closure()
        if not torch.is_tensor(loss):
            raise TypeError(f"the closure must return the loss tensor it backpropagated, got {type(loss).__name__}")
        return loss.detach()


class GradLedger:
    """Who wrote `.grad` since the last update: the closure front-end's bookkeeping of the contract above.

    One mutable object, so that wrappers copying the optimizer's attributes (Lightning's
    LightningOptimizer) share it. `left` holds, per parameter, a weak reference to the gradient the
    last update (or `zero_grad()`) left and its version counter: unchanged means nobody wrote it since.
    """

    def __init__(self):
        self.in_step = False  # a closure is running under accumulate()/step(closure)
        self.window_open = False  # micro-batches of the current update have run
        self.left = {}

    def record(self, params):
        """The gradients now in `.grad` are the optimizer's own (after an update or zero_grad)."""
        self.window_open = False
        self.left = {id(p): (weakref.ref(p.grad), p.grad._version) for p in params if p.grad is not None}

    def foreign(self, params) -> list[int]:
        """Indices of parameters whose `.grad` was written outside the optimizer since `record`."""
        out = []
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            left = self.left.get(id(p))
            if left is None or left[0]() is not p.grad or left[1] != p.grad._version:
                out.append(i)
        return out


class SAM(torch.optim.Optimizer):
    """A closure optimizer that runs a SAM variant around `base_optimizer` (see the module docstring).

    params: the parameters, as `model.named_parameters()` (names are needed by `adaptive`,
        `perturb` modes other than trainable and the patterns) or plain tensors / param groups.
    base_optimizer: an optimizer over the same parameters, or an optimizer class built here with
        `params` and `base_kwargs`.
    config: a SAMConfig (default: SAM, rho 0.05). model: the (wrapped) model: names, BatchNorm
        buffers, `no_sync` under DDP. max_steps: needed by `start`/`end` and schedules that read
        the training length. seed: the seed of variants that draw noise.
    """

    def __init__(self, params, base_optimizer, config: SAMConfig | None = None, *, model=None, max_steps=None,
                 seed=0, **base_kwargs):
        params = list(params)
        names = None
        if params and isinstance(params[0], tuple):
            names = {id(p): n for n, p in params}
            params = [p for _, p in params]
        if isinstance(base_optimizer, type):
            base_optimizer = base_optimizer(params, **base_kwargs)
        elif base_kwargs:
            raise TypeError(f"unexpected arguments {sorted(base_kwargs)}: they configure a base optimizer class; "
                            "pass the class instead of an instance")
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer or its class, got {base_optimizer!r}")
        config = SAMConfig() if config is None else config
        if not isinstance(config, SAMConfig):
            raise TypeError(f"config must be a hf_sam.SAMConfig, got {type(config).__name__}")
        variant = get_variant(config.variant)
        if variant.trainer_only or variant.hooks or (variant.on_setup is not None and variant.check_optimizer is None):
            raise ValueError(f"variant={config.variant!r} needs the Trainer (its dataset, loss hooks or callbacks) "
                             "and cannot run in hf_sam.SAM; use SAMTrainer, or another variant.")
        if config.rho_scaling != "none" and model is None:
            raise ValueError(f"rho_scaling={config.rho_scaling!r} reads the model's layers: pass model=.")
        if (config.start > 0 or config.end < 1) and not max_steps:
            raise ValueError(f"start={config.start}/end={config.end} are fractions of training: pass max_steps=.")
        if variant.check_optimizer is not None:
            variant.check_optimizer(base_optimizer)
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        self.param_groups = base_optimizer.param_groups  # one set of groups: LR schedules act on both
        self.state = base_optimizer.state
        self.base_optimizer = base_optimizer
        self.config, self.variant = config, variant
        self.model, self.max_steps, self.seed = model, max_steps, seed
        self.sam_state: dict = {}
        self.steps = 0
        self.last_loss = None
        self._names = names
        self._flags: set = set()
        self._selection = None
        self._metrics = None
        self._ledger = GradLedger()
        self._ledger.record(unique_trainable(self.param_groups))
        self._strategy = None
        if names is None and model is None and (config.effective_adaptive or config.perturb != "trainable"
                                                or config.perturb_include or config.perturb_exclude):
            raise ValueError("adaptive ascent, perturb modes and patterns read parameter names: pass "
                             "model.named_parameters() as params, or model=.")

    # ---- the step --------------------------------------------------------------------------------
    def accumulate(self, closure):
        """One micro-batch: the variant's passes, its descent gradient added to `.grad`; no update."""
        ledger = self._ledger
        if ledger.in_step:
            raise RuntimeError("hf_sam.SAM.accumulate/step(closure) called from inside its own closure")
        if not ledger.window_open:
            self._start_window()
        ledger.window_open = ledger.in_step = True
        try:
            if not sam_active(self.config, self.variant, self.steps, self.max_steps):
                with torch.enable_grad():
                    loss = closure()
                self.last_loss = loss.detach() if torch.is_tensor(loss) else loss
                return loss
            sharding, config = self._sharding()
            ctx = StepContext(ClosureFrontEnd(self, closure), config, self._selected(), self.sam_state,
                              self._metric_sums(), sharding=sharding)
            self.last_loss = run_step(self.variant, ctx)
            return self.last_loss
        finally:
            ledger.in_step = False

    def step(self, closure=None):
        """With a closure: `accumulate(closure)` then the base optimizer's step. Without: the step only."""
        loss = self.accumulate(closure) if closure is not None else None
        self.base_optimizer.step()
        self.steps += 1
        self._ledger.record(unique_trainable(self.param_groups))
        return loss

    def zero_grad(self, set_to_none: bool = True):
        """Clear the gradients; called by the closure during a step, it does nothing (the step owns `.grad`)."""
        if self._ledger.in_step:
            return
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
        self._ledger.record(unique_trainable(self.param_groups))

    @staticmethod
    def unwrap(optimizer) -> "SAM":
        """The hf_sam.SAM inside a wrapper (accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer)."""
        seen = optimizer
        for _ in range(8):  # wrappers keep the wrapped optimizer as .optimizer (accelerate) or ._optimizer
            inner = getattr(seen, "_optimizer", None) or getattr(seen, "optimizer", None)
            if inner is None:
                if isinstance(seen, SAM):
                    return seen
                break
            seen = inner
        raise TypeError(f"{type(optimizer).__name__} does not wrap a hf_sam.SAM")

    # ---- state -------------------------------------------------------------------------------------
    def state_dict(self):
        return {"base": self.base_optimizer.state_dict(), "sam_state": dict(self.sam_state), "steps": self.steps}

    def load_state_dict(self, state_dict):
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.state = self.base_optimizer.state
        self.sam_state.clear()
        self.sam_state.update(state_dict.get("sam_state", {}))
        self.steps = int(state_dict.get("steps", 0))

    def metrics(self) -> dict[str, float]:
        """`sam/*` means since the last call (sharpness, grad_norm, perturbation_norm, skipped); one host sync."""
        if self._metrics is None:
            return {}
        vec = self._metrics.vector()
        _, world = self._world()
        if world > 1:
            torch.distributed.all_reduce(vec)
        totals = dict(zip(Metrics.KEYS, vec.tolist()))
        self._metrics.reset()
        return self._metrics.means(totals)

    # ---- internals ---------------------------------------------------------------------------------
    def _start_window(self):
        """First micro-batch of an update: drop what the last update left in `.grad`, refuse foreign gradients."""
        params = unique_trainable(self.param_groups)
        foreign = self._ledger.foreign(params)
        if foreign:
            names = [self._names.get(id(params[i]), f"parameter {i}") if self._names else f"parameter {i}"
                     for i in foreign[:3]]
            raise RuntimeError(
                f"hf_sam.SAM: gradients were written into .grad outside the optimizer since the last update "
                f"({', '.join(names)}{', ...' if len(foreign) > 3 else ''}); they would join this update without "
                "the sharpness-aware step. Run every micro-batch through opt.accumulate(closure) (and the last "
                "through opt.step(closure), or opt.step()), and call opt.zero_grad() before a step if you ran a "
                "backward outside it. PyTorch Lightning: accumulate_grad_batches > 1 runs the earlier micro-batches "
                "outside the optimizer; use manual optimization with opt.accumulate(closure) instead.")
        for p in params:
            p.grad = None

    def _world(self):
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return 0, 1
        if self._sharding()[0].kind == "fsdp2":  # FSDP2 (hf_sam.sharded): the ascent mode is sync_ascent's
            return dist.get_rank(), dist.get_world_size()
        if self.model is None or not hasattr(self.model, "no_sync"):
            if "no_ddp_model" not in self._flags:
                self._flags.add("no_ddp_model")
                warnings.warn("hf_sam.SAM in a multi-process run without the DDP-wrapped model: the ascent "
                              "gradients are all-reduced (global ascent). Pass model=ddp_model for the per-device "
                              "ascent.", stacklevel=4)
            return dist.get_rank(), 1
        return dist.get_rank(), dist.get_world_size()

    def _sharding(self):
        """(strategy, config): FSDP2 when the parameters are DTensors or model= is fully_shard-ed
        (hf_sam.sharded.for_closure: sync_ascent None means global ascent there), else Replicated."""
        if self._strategy is None or self._strategy[0] is not self.model:  # opt.model may be set late
            self._strategy = (self.model, *sharded.for_closure(unique_trainable(self.param_groups), self.model,
                                                               self.config))
        return self._strategy[1:]

    def _selected(self):
        if self._selection is None:
            params = unique_trainable(self.param_groups)
            names = None
            if self._names is not None:
                names = [self._names.get(id(p), f"<unnamed parameter {i}>") for i, p in enumerate(params)]
            model = getattr(self.model, "module", self.model)
            self._selection = build_selection(model, params, self.config, names=names)
        return self._selection

    def _metric_sums(self) -> Metrics:
        if self._metrics is None:
            self._metrics = Metrics(self._selected().params[0].device)
        return self._metrics
