"""Sharded data parallelism for SAMTrainer: FSDP2 and DeepSpeed ZeRO-1/2 (exact, both ascent modes).

What sharding changes in a SAM step (the variants do not see it; hf_sam.ops takes DTensors):

FSDP2
- Global ascent (`sync_ascent=True`, the default under FSDP): every pass reduce-scatters, so the
  sharded gradients of the clean pass are the global-batch mean. The norm is one fp32 scalar
  all-reduce of the local shards' squared norms (ops.global_norm); e is added to the local shards in
  place and the weights come back by copy from a snapshot of the local shards. Each group is
  resharded before a pass, so the forward all-gathers the current shards (after a forward without
  backward the root group stays unsharded and would not see in-place shard edits).
- Per-device ascent (`sync_ascent=False`, the SAM paper's m = per-device batch): the clean pass runs
  with `set_requires_gradient_sync(False)` and `set_reshard_after_backward(False)`, so each device
  keeps the full (unsharded) parameters and its own full gradient; the step works on those
  (ctx.params) until the descent pass, which runs without resharding after forward (nothing is
  all-gathered again), reduce-scatters g(w + e_r) and reshards, dropping w + e_r. The shards never
  move. Memory: DDP-level during the step.
- Gradient accumulation: the Trainer's `no_sync` on non-final micro-batches would keep the clean
  pass's gradient unsharded and mix it into the next reduce-scatter. Each SAM pass sets the gradient
  sync itself (sync_each_batch semantics): one reduce-scatter per pass and micro-batch.

HSDP (FSDP2 on a 2-D (replicate, shard) mesh: shard inside a node, replicate across nodes)
- Global and per-device ascent as above; the norm's scalar all-reduce runs over the shard group
  only (ops._shard_group: the replicas hold copies of the same shards).
- `sync_ascent="node"`: the ascent over the node's batch. The clean pass runs as per-device, then one
  flat all-reduce of the full gradient inside the shard group gives the node mean; the rest is the
  per-device path. No inter-node collective for the ascent; DDP-level memory during the step (the
  sharded-memory route, FSDP's private `_partial_reduce_output`, is in docs/probes/scale_out).
- An explicit per-device descent gradient is reduced over every mesh dim (a Partial on each).

hf_sam.SAM (the closure optimizer) uses the FSDP2 strategy when its parameters are DTensors or its
`model=` holds fully_shard modules (`for_closure`).

DeepSpeed ZeRO-1/2 (parameters replicated, gradients and optimizer states partitioned)
- A temporary pass runs the stock loss on detached leaves that share the parameters' storage, with
  a plain backward into them: ZeRO's gradient hooks and the engine's backward epilogue never run.
  Global ascent all-reduces that gradient (one flat all-reduce).
- The descent pass is the stock one; accelerate calls `engine.step()` inside its backward on the
  last micro-batch, so the weights are put back at w just before that step.
- An explicit descent gradient d (set_final: GSAM, LookSAM) goes through the engine as the backward
  of sum_i <p_i, d_i>.

Refused with a message: FSDP1 (set fsdp_version 2), ZeRO-3, DeepSpeed offload and fp16, the
variants not listed below, rsam with per-device ascent under FSDP2, "node" outside HSDP, and a run that asked for FSDP or DeepSpeed but was set up without it
(accelerate does not shard on a CPU).

Each backend is a sharding strategy (`FSDP2`, `DeepSpeed`: subclasses of hf_sam.step.Replicated,
the plain/DDP one) that the Trainer front-end picks once (`configure`) and hands to every step
context. A strategy changes the step only through the context's public operations (`use_params`,
`discard_move`, `move_to_w`) and keeps its per-micro-batch state in `ctx.scratch`.
"""

import dataclasses
import logging
import os
from contextlib import contextmanager, nullcontext

import torch

from . import ops
from .step import REPLICATED, Replicated, unique_trainable

logger = logging.getLogger(__name__)

# Variants tested under DeepSpeed ZeRO-1/2 and FSDP2, both ascent modes (rsam: global only), against their
# single-process references (tests/test_fsdp.py, tests/test_deepspeed.py). Others are refused there.
SHARDED_VARIANTS = ("sam", "asam", "gsam", "looksam", "fsam", "rsam")
DEEPSPEED_VARIANTS = ("sam", "asam", "gsam", "looksam", "fsam")
# FSDP2 also runs these: their per-tensor reductions (RWP's filter norms) run inside the noise draw, which
# sees full tensors (common.random_perturbation -> ops.draw_like), not in the step on the shards.
FULL_DRAW_VARIANTS = ("rwp",)
FSDP2_VARIANTS = SHARDED_VARIANTS + FULL_DRAW_VARIANTS
# FSDP2 per-device ascent holds the unsharded parameters only after a pass at w; these move w first.
FSDP2_GLOBAL_ONLY = {"rsam": "its first pass is at w + noise (the per-device ascent under FSDP2 holds each "
                             "device's unsharded parameters only after a pass at w)"}


def _env_true(name):
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def kind(trainer):
    """'fsdp2', 'fsdp1', 'deepspeed' or None, from the accelerator the trainer set up."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        return "deepspeed"
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
        return "fsdp2" if getattr(plugin, "fsdp_version", 1) == 2 else "fsdp1"
    model = getattr(trainer, "model", None)
    if model is not None and _fsdp_modules(model):  # sharded with fully_shard before the Trainer saw it
        return "fsdp2"
    return None


def requested(args):
    """What the user asked for: 'FSDP', 'DeepSpeed' or None (TrainingArguments or accelerate launch)."""
    if getattr(args, "deepspeed", None) or _env_true("ACCELERATE_USE_DEEPSPEED"):
        return "DeepSpeed"
    if getattr(args, "fsdp", None) or _env_true("ACCELERATE_USE_FSDP"):
        return "FSDP"
    return None


def check(trainer):
    """Refuse what cannot run (DeepSpeed, FSDP1, sharding asked for but not set up). Raises ValueError."""
    k = kind(trainer)
    asked = requested(trainer.args)
    if k is None and asked is not None and trainer.accelerator.num_processes > 1:
        raise ValueError(
            f"{asked} was requested (TrainingArguments or accelerate config) but accelerate set up "
            f"{trainer.accelerator.distributed_type} instead: on a CPU (use_cpu=True) accelerate does not shard, so "
            f"this run would silently train replicated copies (DDP) with DDP's memory. hf_sam stops here. "
            f"To train with DDP on purpose remove `{'deepspeed' if asked == 'DeepSpeed' else 'fsdp'}` from the "
            f"arguments (accelerate launch: use configs/accelerate/multi_cpu.yaml); to shard, run on GPUs.")
    if k == "deepspeed":
        cfg = _deepspeed_config(trainer)
        zero = cfg.get("zero_optimization", {}) or {}
        stage = int(zero.get("stage", 0) or 0)
        if stage not in (1, 2):
            raise ValueError(f"hf_sam supports DeepSpeed ZeRO stages 1 and 2 (got stage {stage}): ZeRO-3 partitions "
                             "the parameters, which the ascent would have to perturb in the partitions and "
                             "re-gather (global ascent: measured feasible, not implemented yet; per-device "
                             "ascent: not feasible, the full-weight forward fails in ZeRO-3's fetch hook with "
                             "\"'Tensor' object has no attribute 'ds_status'\"). Use FSDP2 "
                             "(configs/accelerate/fsdp.yaml) to shard the parameters.")
        offload = [key for key in ("offload_optimizer", "offload_param")
                   if str((zero.get(key) or {}).get("device", "none")).lower() != "none"]
        if offload:
            raise ValueError(f"hf_sam does not support DeepSpeed {' and '.join(offload)} (untested); remove it.")
        if (cfg.get("fp16", {}) or {}).get("enabled") in (True, "true"):
            raise ValueError("hf_sam does not support DeepSpeed fp16 (its loss scaler owns the backward); use bf16 "
                             "or fp32.")
    if k == "fsdp1":
        raise ValueError(
            "hf_sam supports FSDP2 only: FSDP1 flattens the parameters into one sharded buffer, which the "
            "ascent cannot perturb and restore per parameter. Set `fsdp_version: 2` in fsdp_config (or "
            "fsdp_version: 2 in the accelerate config).")


def _deepspeed_config(trainer):
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return getattr(plugin, "deepspeed_config", None) or {}


def configure(trainer, config, previous=None):
    """(strategy, config) for this trainer: the sharding strategy of its run, and `config` with the
    variant checked under FSDP2 / DeepSpeed and sync_ascent=None (auto) resolved.

    previous: the strategy this trainer used so far (the auto-ascent warning is given once per trainer).
    """
    k = kind(trainer)
    if config.sync_ascent == NODE and k != "fsdp2":
        _refuse_node(f"this run is {'DeepSpeed' if k == 'deepspeed' else 'not sharded with FSDP2'}")
    if k == "deepspeed":  # ZeRO-1/2 keep the parameters replicated: per-device ascent by default, as DDP
        if config.variant not in DEEPSPEED_VARIANTS:
            raise ValueError(
                f"variant {config.variant!r} is not supported under DeepSpeed yet (only "
                f"{', '.join(DEEPSPEED_VARIANTS)} are tested). Use DDP for {config.variant!r}.")
        return DeepSpeed(), config
    if k != "fsdp2":  # DDP or one process: sync_ascent=None reads as False (per-device ascent)
        return REPLICATED, config
    strategy, config = _fsdp2(config)
    if strategy.sync_ascent_auto and not (previous is not None and previous.sync_ascent_auto):  # once per trainer
        logger.warning(
            "hf_sam: FSDP run, sync_ascent not set: using global ascent (sync_ascent=True, m = global batch; "
            "sharded memory; each pass all-gathers and reduce-scatters, +1 scalar all-reduce per micro-batch). Set "
            "sync_ascent=False for the SAM paper's per-device ascent (DDP-level memory during the step).")
    return strategy, config


NODE = "node"  # sync_ascent: the ascent within HSDP's shard group (m = the node's batch)
NODE_REFUSED = {"rsam": "its noise is drawn per device", "rwp": "its noise is drawn per device"}


def _refuse_node(why):
    raise ValueError(f"sync_ascent='node' (the ascent within the shard group) needs HSDP: FSDP2 on a 2-D "
                     f"(replicate, shard) device mesh; {why}. Use sync_ascent=True (global) or False (per device).")


def _fsdp2(config, where="FSDP"):
    """(FSDP2 strategy, config with sync_ascent resolved: None -> True), or ValueError for a variant it cannot run."""
    auto = config.sync_ascent is None
    if auto:
        config = dataclasses.replace(config, sync_ascent=True)
    if config.variant not in FSDP2_VARIANTS:
        raise ValueError(
            f"variant {config.variant!r} is not supported under {where} yet (only {', '.join(FSDP2_VARIANTS)} are "
            f"tested on sharded parameters). Use DDP for {config.variant!r}.")
    if config.sync_ascent == NODE and config.variant in NODE_REFUSED:
        raise ValueError(f"variant {config.variant!r} cannot use sync_ascent='node': "
                         f"{NODE_REFUSED[config.variant]} (untested per node). Use sync_ascent=True.")
    if config.sync_ascent is False and config.variant in FSDP2_GLOBAL_ONLY:
        raise ValueError(f"variant {config.variant!r} runs under {where} with global ascent only "
                         f"(sync_ascent=True): {FSDP2_GLOBAL_ONLY[config.variant]}.")
    return FSDP2(sync_ascent_auto=auto), config


def for_closure(params, model, config):
    """(strategy, config) for hf_sam.SAM: FSDP2 when a parameter is a DTensor or `model` holds a
    fully_shard module (global ascent unless sync_ascent=False, which needs model=), else Replicated."""
    fsdp = model is not None and bool(_fsdp_modules(model))
    if not fsdp and not any(ops.is_sharded(p) for p in params):
        if config.sync_ascent == NODE:
            _refuse_node("these parameters are not sharded with FSDP2")
        return REPLICATED, config
    strategy, config = _fsdp2(config, where="FSDP2 in hf_sam.SAM")
    if config.sync_ascent in (False, NODE) and not fsdp:
        raise ValueError(f"hf_sam.SAM(config=SAMConfig(sync_ascent={config.sync_ascent!r})) on FSDP2-sharded parameters: the "
                         "per-device ascent works on each device's unsharded parameters, which it reaches through "
                         "the model: pass model=<the fully_shard root module> (or set sync_ascent=True, global "
                         "ascent, which needs no model).")
    return strategy, config


def setup(trainer, config, previous=None):
    """`config` resolved for this trainer (the checks of `configure`, without the strategy)."""
    return configure(trainer, config, previous)[1]


class FSDP2(Replicated):
    """FSDP2 (fully_shard): global ascent on the shards, or per-device ascent on unsharded parameters."""

    kind = "fsdp2"

    def __init__(self, sync_ascent_auto=False):
        self.sync_ascent_auto = sync_ascent_auto

    def pass_context(self, ctx, sync, final):
        if ctx.model is None:  # hf_sam.SAM without model= (global ascent only): FSDP reduces every backward
            return nullcontext()
        return _fsdp_pass(ctx, sync, final)

    def descend(self, ctx, d) -> bool:
        return _fsdp_descend_with(ctx, d)

    def grads_are_global(self, ctx) -> bool:
        return True  # every pass reduce-scatters (a per-device d goes through `descend`)

    def release(self, ctx) -> None:
        release(ctx)

    def weights_moved(self, ctx) -> None:
        """The shards moved outside a pass: a module still holding its gathered parameters (the root keeps
        them after a forward without backward, e.g. rsam's no-grad L(w)) would serve the old values to the
        next forward, so every FSDP module reshards (the next forward gathers the moved shards)."""
        state = ctx.scratch.get(_STEP)
        if ctx.model is not None and (state is None or state.held is None):
            _reshard(_fsdp_modules(ctx.model))

    def state_to_save(self, state):
        """sam_state with every DTensor replaced by its local shard (each rank saves its own file)."""
        return _map(state, lambda t: t.to_local() if ops.is_sharded(t) else t)

    def state_loaded(self, state, optimizer):
        return _state_loaded(state, optimizer)


class DeepSpeed(Replicated):
    """DeepSpeed ZeRO-1/2: replicated parameters, the engine's partitioned gradients and step."""

    kind = "deepspeed"

    def pass_context(self, ctx, sync, final):
        return _deepspeed_pass(ctx, sync, final)

    def descend(self, ctx, d) -> bool:
        """d goes through the engine like any other gradient: a backward of sum_i <p_i, d_i> (whose
        gradient is d) lets ZeRO reduce it (the mean over processes) and accelerate step on the last
        micro-batch."""
        pairs = [(p, x) for p, x in zip(ctx.params, d) if x is not None]
        surrogate = sum((p * x.detach().to(p.dtype)).sum() for p, x in pairs)
        ctx.trainer.accelerator.backward(surrogate, scale_wrt_gas=False)
        return True

    def trainable(self, model):
        """The module's trainable parameters (the engine's optimizer holds flat partitions)."""
        return unique_trainable([{"params": list(model.parameters())}])


# ---- FSDP2 mechanics --------------------------------------------------------------------------------
def _fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _fsdp_params(modules):
    """FSDPParam of each sharded parameter, by id of the sharded parameter."""
    out = {}
    for m in modules:
        for group in m._get_fsdp_state()._fsdp_param_groups:
            for fp in group.fsdp_params:
                out[id(fp.sharded_param)] = fp
    return out


def _reshard(modules):
    for m in modules:
        m.reshard()


class _StepState:
    """Per micro-batch: the unsharded parameters held between the passes of a per-device ascent."""

    def __init__(self, ctx):
        self.modules = _fsdp_modules(ctx.model)  # pre-order: the root comes first
        if not self.modules:
            raise RuntimeError("FSDP2 is enabled but the model has no fully_shard module")
        self.root = self.modules[0]
        self.held = None  # FSDPParam list aligned with ctx.selection.params while unsharded is held
        self.node_group = None  # sync_ascent="node": HSDP's shard group


def _node_group(params):
    """HSDP's shard group (the mesh dim the parameters are sharded on), for sync_ascent='node'."""
    for p in params:
        if ops.is_sharded(p):
            if p.device_mesh.ndim < 2:
                _refuse_node(f"the parameters are sharded on a {p.device_mesh.ndim}-D mesh, where the shard "
                             "group is every process (the global ascent)")
            dims = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
            return p.device_mesh.get_group(dims[0])
    _refuse_node("no parameter is sharded")


def _group_mean_(tensors, group):
    """Each tensor becomes its mean over `group`, in place (one flat all-reduce, the tensors' dtype)."""
    import torch.distributed as dist

    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat.div_(dist.get_world_size(group))
    for t, x in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(x.view_as(t))


_STEP = "fsdp2"  # ctx.scratch entry: the _StepState of this micro-batch


def _state(ctx):
    st = ctx.scratch.get(_STEP)
    if st is None:
        st = ctx.scratch[_STEP] = _StepState(ctx)
    return st


@contextmanager
def _fsdp_pass(ctx, sync, final):
    st = _state(ctx)
    root = st.root
    if st.held is None:
        _reshard(st.modules)  # the forward must all-gather the current shards (they may have moved)
    saved_forward = None
    if st.held is not None:  # keep w + e unsharded: no reshard after forward, no re-all-gather in backward
        saved_forward = [(m._get_fsdp_state(), m._get_fsdp_state()._auto_reshard_after_forward,
                          [(g, g.post_forward_mesh_info) for g in m._get_fsdp_state()._fsdp_param_groups])
                         for m in st.modules]
        root.set_reshard_after_forward(False)
    node = sync == NODE
    if node and st.node_group is None:
        st.node_group = _node_group(ctx.selection.params)
    reduce = final or (bool(sync) and not node)
    root.set_requires_gradient_sync(reduce)
    if not reduce:
        root.set_reshard_after_backward(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)
        root.set_reshard_after_backward(True)
        if saved_forward is not None:
            for state, auto, groups in saved_forward:  # back to each module's own setting
                state._auto_reshard_after_forward = auto
                for group, info in groups:
                    group.post_forward_mesh_info = info
    if not reduce:
        _hold_unsharded(ctx, st)
        if node:  # the node's mean gradient: one flat all-reduce inside the shard group (no inter-node traffic)
            _group_mean_([p.grad for p in ctx.params if p.grad is not None], st.node_group)
    elif st.held is not None and final:
        _drop_unsharded(ctx, st)


def _hold_unsharded(ctx, st):
    """After a per-device pass: the step works on the unsharded parameters and their local gradients."""
    if st.held is None:
        by_id = _fsdp_params(st.modules)
        sharded = ctx.selection.params
        missing = [n for n, p in zip(ctx.names, sharded) if id(p) not in by_id]
        if missing:
            raise ValueError(f"per-device ascent under FSDP needs every trained parameter sharded by FSDP2; not "
                             f"sharded: {', '.join(missing[:3])}. Set sync_ascent=True.")
        st.held = [by_id[id(p)] for p in sharded]
    unsharded = []
    for fp in st.held:
        u = fp.unsharded_param
        if fp.unsharded_accumulated_grad is not None:  # reduce_dtype differs: FSDP moved the grad there
            u.grad = fp.unsharded_accumulated_grad.to(u.dtype)
            fp.unsharded_accumulated_grad = None
        unsharded.append(u)
    ctx.use_params(unsharded)


def _drop_unsharded(ctx, st):
    """The descent pass resharded: w + e is gone with the unsharded parameters; the shards never moved."""
    ctx.use_params(None)
    ctx.discard_move()
    st.held = None


def release(ctx):
    """Called when a micro-batch ends (also on error): drop held unsharded parameters and their grads."""
    st = ctx.scratch.get(_STEP)
    if st is None or st.held is None:
        return
    for fp in st.held:
        fp.unsharded_param.grad = None
    _reshard(st.modules)
    _drop_unsharded(ctx, st)


# ---- DeepSpeed ZeRO-1/2 mechanics -------------------------------------------------------------------
# The module's parameters are full and replicated; the engine's optimizer holds flat fp32 partitions,
# and its backward sends the gradients into them through hooks on the parameters (p.grad stays None).
def _engine(ctx):
    return ctx.trainer.accelerator.deepspeed_engine_wrapped.engine


@contextmanager
def _patched(obj, name, value):
    """obj.<name> is `value` inside the block (an instance attribute; what was there before comes back)."""
    attrs = vars(obj)  # not setattr: nn.Module.__setattr__ would register a module value as a submodule
    missing = object()
    before = attrs.get(name, missing)
    attrs[name] = value
    try:
        yield
    finally:
        if before is missing:
            attrs.pop(name, None)
        else:
            attrs[name] = before


@contextmanager
def _deepspeed_pass(ctx, sync, final):
    acc, engine = ctx.trainer.accelerator, _engine(ctx)
    if final:
        # accelerate runs engine.step() inside accelerator.backward on the last micro-batch: put w back
        # first, so the step starts from w (its fp32 master copy never moved) and nothing is restored after.
        real_step = engine.step

        def step(*args, **kwargs):
            ctx.move_to_w()
            return real_step(*args, **kwargs)

        with _patched(engine, "step", step):
            yield
        return
    # a temporary pass: the same forward and loss on detached leaves that share the parameters' storage
    # (so they see w + e), and a plain backward into the leaves: ZeRO's hooks do not fire, nothing is
    # reduced, and the engine's gradient buffers and step counters stay as they were.
    from torch.nn.utils.stateless import _reparametrize_module

    module = engine.module
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    leaves = {n: p.detach().requires_grad_() for n, p in named}
    # the engine's own forward would hook its outputs to run DeepSpeed's backward epilogue: call the module
    with _patched(acc, "backward", lambda loss, **kwargs: loss.backward()), _patched(engine, "forward", module), \
            _reparametrize_module(module, leaves, tie_weights=True):
        yield
    leaf_of = {id(p): leaves[n] for n, p in named}
    grads = [leaf_of[id(p)].grad if id(p) in leaf_of else None for p in ctx.params]
    if sync and ctx.num_processes > 1:  # global ascent: the mean over processes, one all-reduce
        ops.all_mean_([g for g in grads if g is not None], ctx.num_processes, flat=True)
    for p, g in zip(ctx.params, grads):
        p.grad = g  # read and cleared by the step right after this pass


# ---- checkpoints: the variants' state holds DTensors under FSDP ---------------------------------------
def _state_loaded(state, optimizer):
    """Inverse of FSDP2.state_to_save: lists aligned with the trained parameters get their DTensor specs back."""
    if optimizer is None:
        return state
    from torch.distributed.tensor import DTensor

    params = unique_trainable(optimizer.param_groups)  # what the variants' lists are aligned with

    def wrap(value):
        if isinstance(value, list) and len(value) == len(params):
            return [DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                    if torch.is_tensor(t) and ops.is_sharded(p) else wrap(t) for t, p in zip(value, params)]
        if isinstance(value, dict):
            return {k: wrap(v) for k, v in value.items()}
        return value

    return wrap(state)


def _map(value, fn):
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    return fn(value) if torch.is_tensor(value) else value


def _fsdp_descend_with(ctx, d):
    """FSDP2 per-device ascent: d is this device's full gradient; it is averaged and reduce-scattered
    into the sharded gradients, and the unsharded parameters are dropped. Global ascent: d is sharded
    and global already (False: the step adds it)."""
    st = ctx.scratch.get(_STEP)
    if st is None or st.held is None:
        return False
    from torch.distributed.tensor import DTensor, Partial

    release(ctx)  # weights are at w (set_final restored them); the shards never moved
    world = ctx.num_processes
    with torch.no_grad():
        for p, x in zip(ctx.selection.params, d):  # every process reduces every parameter (collectives)
            full = torch.zeros(p.shape, dtype=p.dtype, device=p.to_local().device) if x is None else x.detach()
            # a partial sum over every mesh dim (HSDP: replicas and shards), reduced to p's placements
            mean = DTensor.from_local(full, p.device_mesh, [Partial()] * p.device_mesh.ndim, shape=p.shape,
                                      stride=p.stride(),
                                      run_check=False).redistribute(p.device_mesh, p.placements)
            mean.to_local().div_(world)
            if p.grad is None:
                p.grad = mean
            else:
                p.grad.to_local().add_(mean.to_local())
    return True
