"""Item 4: hf_sam.SAM (closure optimizer) on a model sharded with fully_shard (1-D mesh, 2 gloo processes).

Run with PYTHONPATH=/work/main. Cases (comma-separated): NAME where NAME in
  sam_global        : SAM(model.named_parameters(), SGD, SAMConfig(rho), lr), no model=  (expects global ascent)
  sam_global_model  : same with model=fsdp_model
  sam_sync_false    : SAMConfig(sync_ascent=False), model=fsdp_model (per-device asked: what happens?)
  sam_global_ga2    : opt.accumulate(closure) x2 then opt.step()
  sam_global_adamw  : AdamW base
  variant:NAME      : other variants, global; only checks that it runs and reports the deviation from plain SAM
"""
import copy, json, os, sys, time, traceback, warnings
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from pcommon import tiny, data, rank_slice, sam_reference, max_dev, RHO, LR, EPS

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
import hf_sam
from hf_sam import SAMConfig
if os.environ.get("PATCH_OPS") == "1":
    # prototype of the ops change HSDP needs: sum only over the mesh dims a tensor is SHARDED on (replicated dims
    # hold identical copies); one Shard dim -> that dim's process group.
    from hf_sam import ops as _ops

    def _shard_group(tensors):
        for t in tensors:
            if _ops.is_sharded(t):
                dims = [i for i, pl in enumerate(t.placements) if pl.is_shard()]
                if any(not (pl.is_shard() or pl.is_replicate()) for pl in t.placements) or len(dims) != 1:
                    raise NotImplementedError(f"placements {t.placements}")
                return t.device_mesh.get_group(dims[0])
        return None
    _ops._shard_group = _shard_group
PER, STEPS = 4, 3


MESH = None
if os.environ.get("MESH") == "2x2":  # HSDP: what the closure optimizer does on a 2-D mesh today
    from torch.distributed.device_mesh import init_device_mesh
    MESH = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))


def build():
    init = tiny()
    model = copy.deepcopy(init)
    fully_shard(model.fc1, mesh=MESH)
    fully_shard(model, mesh=MESH)
    return init, model


def run(name):
    info = {"case": name, "hf_sam": hf_sam.__file__}
    init, model = build()
    ga = 2 if name.endswith("ga2") else 1
    opt_kind = "adamw" if name.endswith("adamw") else "sgd"
    variant = name.split(":")[1] if name.startswith("variant:") else "sam"
    kw = {"variant": variant, "rho": RHO, "eps": EPS}
    if name == "sam_sync_false":
        kw["sync_ascent"] = False
    cfg = SAMConfig(**kw)
    if variant == "psam":
        opt_kind = "adamw"
    base = torch.optim.SGD if opt_kind == "sgd" else torch.optim.AdamW
    bkw = {"lr": LR} if opt_kind == "sgd" else {"lr": LR * 0.1, "weight_decay": 0.01}
    if variant == "msam":
        bkw["momentum"] = 0.9
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt = hf_sam.SAM(model.named_parameters(), base, config=cfg,
                         model=model if name in ("sam_global_model", "sam_sync_false") else None, max_steps=STEPS,
                         **bkw)
        for s in range(STEPS):
            for m in range(ga):
                x, y = data(s, m, world, PER)
                x, y = rank_slice(x, rank, PER), rank_slice(y, rank, PER)

                def closure():
                    loss = model(x, y) / ga
                    loss.backward()
                    return loss
                if m < ga - 1:
                    opt.accumulate(closure)
                else:
                    opt.step(closure)
            opt.zero_grad()
        info["warnings"] = sorted({str(x.message)[:160] for x in w})
    info["grad_types"] = sorted({type(p).__name__ for p in model.parameters()})
    full = [p.full_tensor() for p in model.parameters()]
    if variant == "sam":
        mode = "device" if name == "sam_sync_false" else "global"
        ref, _ = sam_reference(init, STEPS, world, mode, opt_kind, ga=ga)
        info[f"max_dev_vs_{mode}_ref"] = max_dev(full, ref)
        other = "global" if mode == "device" else "device"
        o, _ = sam_reference(init, STEPS, world, other, opt_kind, ga=ga)
        info[f"max_dev_vs_{other}_ref"] = max_dev(full, o)
    else:
        ref, _ = sam_reference(init, STEPS, world, "global", opt_kind, ga=ga)
        info["dev_vs_plain_sam_global_ref"] = max_dev(full, ref)
    try:
        info["metrics"] = {k: round(v, 6) for k, v in opt.metrics().items()}
    except Exception as ex:
        info["metrics_error"] = f"{type(ex).__name__}: {str(ex)[:300]}"
    return info


t0 = time.time()
for c in sys.argv[1].split(","):
    try:
        res = run(c)
    except Exception as ex:
        res = {"case": c, "error": f"{type(ex).__name__}: {str(ex)[:600]}", "tb": traceback.format_exc()[-2500:]}
    if rank == 0:
        print("RESULT", json.dumps(res), flush=True)
if rank == 0:
    print("WALL_INSIDE", round(time.time() - t0, 2), flush=True)
dist.barrier()
dist.destroy_process_group()
