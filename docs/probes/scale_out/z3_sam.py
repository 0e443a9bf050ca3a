"""Item 1: SAM on DeepSpeed ZeRO-3 (DS_ACCELERATOR=cpu, gloo, 2 processes), engine API only.

Global ascent, per micro-batch:
  1. clean pass: loss = engine(x, y); engine.backward(loss)  -> ZeRO-3 reduce-scatters (mean) into its fp32
     gradient partitions; read them with deepspeed.utils.safe_get_local_grad(p) (the buffer itself on CPU).
  2. norm = sqrt(all_reduce(sum of local squared partitions)) (one scalar all-reduce).
  3. e_local = rho * g_local / (norm + eps); snapshot p.ds_tensor (the local partition; on CPU fp32 it IS the
     fp32 master: fp32_partitioned_groups_flat aliases it) and add e_local to it in place. Persistent
     parameters (numel < stage3_param_persistence_threshold, kept gathered) are re-gathered.
  4. optimizer.micro_step_id = 0 (copy, not accumulate, into the grad partitions) ; descent pass
     engine.backward(engine(x, y)); add back the previous micro-batches' stash (GA).
  5. restore ds_tensor from the snapshot (re-gather persistent), engine.step().
Per-device ascent ('device'): full params gathered (GatheredParameters), ascent AND descent gradient computed
  on a hook-free copy of the module by functional_call at the gathered w (and w + e_r); the descent gradient
  mean is written into the partitions (safe_set_local_grad) after a plain engine.backward of 0 * loss... (see code).
argv: cases separated by commas: MODE:OPT:GA:THR[:resume]  e.g. global:sgd:1:0
"""
import copy, json, os, sys, time, traceback
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import deepspeed.comm as dscomm
_ds_counts = {}
for _n in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "reduce_scatter_fn",
           "allgather_fn", "broadcast", "inference_all_reduce", "reduce_scatter", "all_to_all_single"):
    if hasattr(dscomm, _n):
        def _w(fn=getattr(dscomm, _n), n=_n):
            def w(*a, **k):
                _ds_counts[n] = _ds_counts.get(n, 0) + 1
                return fn(*a, **k)
            return w
        setattr(dscomm, _n, _w())
from pcommon import tiny, data, rank_slice, sam_reference, max_dev, RHO, LR, EPS, Counter

import deepspeed
from deepspeed.utils import safe_get_local_grad, safe_set_local_grad, safe_get_full_fp32_param
deepspeed.init_distributed(dist_backend="gloo")
import torch.distributed as dist
rank, world = dist.get_rank(), dist.get_world_size()
counter = Counter()
class _DSCounter:
    def snap(self): return dict(_ds_counts)
    def since(self, b): return {k: v - b.get(k, 0) for k, v in _ds_counts.items() if v - b.get(k, 0)}
counter = _DSCounter()
STEPS, PER = 3, 4


def ds_config(opt_kind, ga, thr):
    opt = ({"type": "SGD", "params": {"lr": LR}} if opt_kind == "sgd" else
           {"type": "AdamW", "params": {"lr": LR * 0.1, "weight_decay": 0.01, "torch_adam": True}})
    return {"train_micro_batch_size_per_gpu": PER, "gradient_accumulation_steps": ga, "optimizer": opt,
            "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": thr,
                                  "stage3_prefetch_bucket_size": 0, "overlap_comm": False},
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def build(opt_kind, ga, thr):
    init = tiny()
    engine, _, _, _ = deepspeed.initialize(model=copy.deepcopy(init), model_parameters=None,
                                           config=ds_config(opt_kind, ga, thr))
    return init, engine


def regather_persistent(engine, params=None):
    # Parameters that stay gathered between passes (persistent: numel < stage3_param_persistence_threshold,
    # or any left AVAILABLE) keep their full p.data, which an in-place edit of ds_tensor does not reach;
    # all_gather skips AVAILABLE params, so mark them NOT_AVAILABLE and re-gather from the partitions.
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    pers = list(getattr(engine.optimizer, "persistent_parameters", []))
    seen = {id(p) for p in pers}
    pers += [p for p in (params or []) if id(p) not in seen and p.ds_status == ZeroParamStatus.AVAILABLE]
    if pers:
        for p in pers:
            p.ds_status = ZeroParamStatus.NOT_AVAILABLE
        pers[0].all_gather(pers)


def sam_micro_global(engine, params, x, y, info, first):
    opt = engine.optimizer
    stash = None
    if opt.micro_step_id > 0 or getattr(opt, "_epilogue_ran_this_backward", False):  # GA: previous micro-batches
        stash = [safe_get_local_grad(p).clone() for p in params]
    opt.zero_grad()  # micro_step_id = 0: the clean pass copies into the grad partitions (no accumulation)
    c0 = counter.snap()
    engine.backward(engine(x, y))
    if first:
        info["clean_pass_collectives"] = counter.since(c0)
        info["p_data_numel_after_bwd"] = [p.data.numel() for p in params]
        info["ds_tensor_numel"] = [p.ds_tensor.numel() for p in params]
        info["p_grad_after_bwd"] = [None if p.grad is None else tuple(p.grad.shape) for p in params]
    g = [safe_get_local_grad(p) for p in params]  # local fp32 partitions (live buffers)
    c1 = counter.snap()
    sq = torch.stack([t.float().pow(2).sum() for t in g]).sum()
    dist.all_reduce(sq)
    norm = sq.sqrt()
    if first:
        info["norm_collectives"] = counter.since(c1)
    scale = RHO / (norm + EPS)
    e = [t * scale for t in g]
    saved = [p.ds_tensor.detach().clone() for p in params]
    with torch.no_grad():
        for p, t in zip(params, e):
            p.ds_tensor.add_(t.view_as(p.ds_tensor).to(p.ds_tensor.dtype))
    regather_persistent(engine, params)
    opt.zero_grad()  # the descent pass copies too; earlier micro-batches come back from the stash
    c2 = counter.snap()
    engine.backward(engine(x, y))
    if first:
        info["descent_pass_collectives"] = counter.since(c2)
    if stash is not None:
        for p, s in zip(params, stash):
            safe_get_local_grad(p).add_(s)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.ds_tensor.copy_(s)
    regather_persistent(engine, params)
    if first:
        from deepspeed.utils import safe_get_local_fp32_param
        info["restored_ds_tensor_bitexact_vs_fp32_master"] = all(
            torch.equal(p.ds_tensor.view(-1), safe_get_local_fp32_param(p).view(-1)) for p in params)
        info["restored_ds_tensor_bitexact_vs_snapshot"] = all(torch.equal(p.ds_tensor, s) for p, s in zip(params, saved))
    return norm


def sam_micro_naive(engine, params, x, y):
    """What a straightforward port does: two engine.backward calls without resetting the partition buffers."""
    engine.backward(engine(x, y))
    g = [safe_get_local_grad(p).clone() for p in params]
    sq = torch.stack([t.pow(2).sum() for t in g]).sum(); dist.all_reduce(sq)
    saved = [p.ds_tensor.detach().clone() for p in params]
    with torch.no_grad():
        for p, t in zip(params, g):
            p.ds_tensor.add_(t.view_as(p.ds_tensor) * (RHO / (sq.sqrt() + EPS)))
    engine.backward(engine(x, y))
    with torch.no_grad():
        for p, t in zip(params, saved):
            p.ds_tensor.copy_(t)


def sam_micro_device(engine, params, x, y, info, first):
    """Per-device ascent on ZeRO-3: gather the full weights, run both passes on detached full copies through
    functional_call (ZeRO's hooks see foreign tensors), average the descent gradient with one all-reduce and
    write its partitions with safe_set_full_grad; the partitions never move (no restore)."""
    from deepspeed.utils import safe_set_full_grad
    names = [n for n, _ in engine.module.named_parameters()]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        full = [p.data.detach().clone() for p in params]
    leaves = [t.clone().requires_grad_() for t in full]
    loss = torch.func.functional_call(engine.module, dict(zip(names, leaves)), (x, y))
    g = torch.autograd.grad(loss, leaves)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(g), 2, dtype=torch.float32)))
    leaves2 = [(t + d * (RHO / (norm + EPS))).detach().requires_grad_() for t, d in zip(full, g)]
    loss2 = torch.func.functional_call(engine.module, dict(zip(names, leaves2)), (x, y))
    d = torch.autograd.grad(loss2 / engine.gradient_accumulation_steps(), leaves2)
    flat = torch.cat([t.reshape(-1) for t in d]); dist.all_reduce(flat); flat /= world
    d = [t.view_as(u) for t, u in zip(flat.split([u.numel() for u in d]), d)]
    for p, t in zip(params, d):
        if engine.optimizer.micro_step_id == 0 and not getattr(engine.optimizer, "_epilogue_ran_this_backward", False):
            safe_set_full_grad(p, t)
        else:
            safe_set_full_grad(p, safe_get_full_grad_(p) + t)
    if first:
        info["device_full_param_numel"] = sum(t.numel() for t in full)


def safe_get_full_grad_(p):
    from deepspeed.utils import safe_get_full_grad
    return safe_get_full_grad(p)


def run_case(mode, opt_kind, ga, thr, resume):
    info = {"case": f"{mode}:{opt_kind}:ga{ga}:thr{thr}" + (":resume" if resume else "")}
    init, engine = build(opt_kind, ga, thr)
    params = [p for p in engine.module.parameters()]
    info["persistent"] = len(getattr(engine.optimizer, "persistent_parameters", []))
    fl = [f.untyped_storage().data_ptr() for f in engine.optimizer.fp32_partitioned_groups_flat]
    info["fp32_master_aliases_ds_tensor"] = [p.ds_tensor.untyped_storage().data_ptr() in fl for p in params]
    info["ds_tensor_dtype"] = str(params[0].ds_tensor.dtype)
    info["t_build"] = round(time.time() - t0, 2)
    first = True
    steps_a = 2 if resume else STEPS
    for s in range(steps_a):
        for m in range(ga):
            x, y = data(s, m, world, PER)
            x, y = rank_slice(x, rank, PER), rank_slice(y, rank, PER)
            if mode == "global":
                sam_micro_global(engine, params, x, y, info, first)
            elif mode == "plain":
                engine.backward(engine(x, y))
            elif mode == "naive":
                sam_micro_naive(engine, params, x, y)
            elif mode == "device":
                sam_micro_device(engine, params, x, y, info, first)
            first = False
            engine.step()
    if resume:
        ck = f"/tmp/probe/ckpt_z3_{opt_kind}_{ga}_{thr}"
        engine.save_checkpoint(ck, tag="t")
        del engine
        init2, engine = build(opt_kind, ga, thr)
        path, _ = engine.load_checkpoint(ck, tag="t")
        info["loaded"] = path is not None
        params = [p for p in engine.module.parameters()]
        for s in range(steps_a, STEPS):
            for m in range(ga):
                x, y = data(s, m, world, PER)
                sam_micro_global(engine, params, rank_slice(x, rank, PER), rank_slice(y, rank, PER), info, False)
                engine.step()
    info["t_train"] = round(time.time() - t0, 2)
    full = [safe_get_full_fp32_param(p) for p in params]
    refmode = {"plain": "plain", "device": "device"}.get(mode, "global")
    ref, _ = sam_reference(init, STEPS, world, refmode, opt_kind, ga=ga)
    if mode in ("device", "global"):
        o, _ = sam_reference(init, STEPS, world, "global" if mode == "device" else "device", opt_kind, ga=ga)
        info["max_dev_vs_other_mode_ref"] = max_dev(full, o)
    info["max_dev_vs_ref"] = max_dev(full, ref)
    other, _ = sam_reference(init, STEPS, world, "plain", opt_kind, ga=ga)
    info["ref_vs_plain_scale"] = max_dev(list(ref.parameters()), other)
    return info


cases = sys.argv[1].split(",")
t0 = time.time()
for c in cases:
    parts = c.split(":")
    mode, opt_kind, ga, thr = parts[0], parts[1], int(parts[2]), int(parts[3])
    resume = len(parts) > 4 and parts[4] == "resume"
    try:
        res = run_case(mode, opt_kind, ga, thr, resume)
    except Exception as ex:
        res = {"case": c, "error": f"{type(ex).__name__}: {str(ex)[:500]}", "tb": traceback.format_exc()[-1500:]}
    if rank == 0:
        print("RESULT", json.dumps(res), flush=True)
if rank == 0:
    print("WALL_INSIDE", round(time.time() - t0, 2), flush=True)
dist.barrier()
os._exit(0)
