"""Item 2/3: SAM on HSDP (FSDP2 on a 2-D mesh ("replicate", "shard")), 4 gloo processes on the CPU.

mesh = init_device_mesh("cpu", (R, S), mesh_dim_names=("replicate", "shard")); rank = r * S + s.
Shard groups ("nodes"): ranks {0,1}, {2,3}; replicate groups: {0,2}, {1,3}. Params: DTensor (Replicate(), Shard(0)).

Modes (per micro-batch):
  global         : clean backward as stock (reduce-scatter in the shard group + all-reduce across replicas:
                   the global mean); norm^2 = all_reduce(sum local shard squares) over the SHARD group only
                   (replicas hold identical shards: reducing over all ranks would count each element R times).
  group_rs       : per-shard-group ascent (m = the node's batch). Clean backward with
                   set_requires_all_reduce(False): FSDP reduce-scatters (AVG) in the shard group only and keeps the
                   result in each param group's private `_partial_reduce_output` (p.grad is NOT set; the buffer
                   would be added into the next all-reducing backward). Read it with FSDP's own layout
                   (as_strided per FSDPParam, offsets of the padded shards), set it to None; norm over the shard
                   group; perturb the local shards in place; descent pass stock; restore; step. Sharded memory.
  group_unsharded: per-shard-group ascent with public controls only: clean pass as per-device
                   (set_requires_gradient_sync(False) + set_reshard_after_backward(False): full local grads),
                   all_reduce(AVG) the full gradients over the shard group (intra-node), perturb the held
                   unsharded params, descent pass without reshard-after-forward (drops w+e). DDP-level memory.
  device         : per-device ascent as hf_sam does today on 1-D FSDP2 (public controls).
argv[1]: comma-separated cases MODE:OPT:GA[:resume]; argv[2] optional tag printed with results.
"""
import copy, json, os, sys, time, traceback
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, FSDPModule
from torch.distributed.tensor import DTensor
from pcommon import tiny, data, rank_slice, sam_reference, max_dev, RHO, EPS

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
R = int(os.environ.get("REPLICATE", "2"))
S = world // R
mesh = init_device_mesh("cpu", (R, S), mesh_dim_names=("replicate", "shard"))
shard_pg, rep_pg = mesh.get_group("shard"), mesh.get_group("replicate")
PER, STEPS = 4, 3

# ---- count collectives, keyed by name@group-size ----
counts = {}
for _n in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_single",
           "reduce_scatter_single", "broadcast", "all_gather"):
    _f = getattr(dist, _n, None)
    if _f is None:
        continue
    def _wrap(fn=_f, n=_n):
        def w(*a, **k):
            g = k.get("group")
            if g is None and n == "all_reduce" and len(a) > 2:
                g = a[2]
            label = ("world" if g is None or dist.get_world_size(g) == world else
                     "shard" if g is shard_pg or dist.get_process_group_ranks(g) == dist.get_process_group_ranks(shard_pg)
                     else "replicate" if dist.get_process_group_ranks(g) == dist.get_process_group_ranks(rep_pg)
                     else str(dist.get_process_group_ranks(g)))
            key = f"{n}@{label}"
            counts[key] = counts.get(key, 0) + 1
            return fn(*a, **k)
        return w
    setattr(dist, _n, _wrap())


def since(c0):
    return {k: v - c0.get(k, 0) for k, v in counts.items() if v - c0.get(k, 0)}


def build():
    init = tiny()
    model = copy.deepcopy(init)
    fully_shard(model.fc1, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return init, model


def fsdp_modules(model):
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def fsdp_params_by_id(model):
    out = {}
    for m in fsdp_modules(model):
        for group in m._get_fsdp_state()._fsdp_param_groups:
            for fp in group.fsdp_params:
                out[id(fp.sharded_param)] = (group, fp)
    return out


def shard_norm(tensors, group):
    loc = torch.stack(torch._foreach_norm([t.to_local() if isinstance(t, DTensor) else t for t in tensors],
                                          2, dtype=torch.float32)).pow(2).sum()
    dist.all_reduce(loc, group=group)
    return loc.sqrt()


def take_partial_reduce_output(model, params):
    """group_rs: the shard-group-mean gradient shards FSDP kept back (requires_all_reduce=False)."""
    by_id = fsdp_params_by_id(model)
    out = {}
    for m in fsdp_modules(model):
        for group in m._get_fsdp_state()._fsdp_param_groups:
            flat = group._partial_reduce_output
            assert flat is not None, "no partial reduce output"
            ws = group.mesh_info.shard_mesh_size
            off = 0
            for fp in group.fsdp_params:
                view = torch.as_strided(flat, size=fp.sharded_size, stride=fp.contiguous_sharded_stride,
                                        storage_offset=flat.storage_offset() + off)
                out[id(fp.sharded_param)] = view.clone()
                padded0 = -(-fp._orig_size[0] // ws) * ws if len(fp._orig_size) else 1
                off += (padded0 * (fp._orig_size[1:].numel() if len(fp._orig_size) > 1 else 1)) // ws
            group._partial_reduce_output = None
    return [out[id(p)] for p in params]


def run_case(mode, opt_kind, ga, resume, tag):
    info = {"case": f"{mode}:{opt_kind}:ga{ga}" + (":resume" if resume else ""), "tag": tag, "mesh": [R, S]}
    init, model = build()
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    from pcommon import make_opt
    opt = make_opt(params, opt_kind)
    if rank == 0:
        info["placements"] = str(params[0].placements)
    root = model
    steps_a = 2 if resume else STEPS
    s = 0

    def one_step(s, first):
        for m in range(ga):
            x, y = data(s, m, world, PER)
            x, y = rank_slice(x, rank, PER), rank_slice(y, rank, PER)
            scale_loss = 1.0 / ga
            c0 = dict(counts)
            if mode in ("global", "group_rs", "plain"):
                stash = None
                if m > 0:  # GA: the descent grads of earlier micro-batches, set aside during the ascent
                    stash = [p.grad for p in params]
                    for p in params:
                        p.grad = None
                if mode == "plain":
                    (model(x, y) * scale_loss).backward()
                    continue
                if mode == "group_rs":
                    root.set_requires_all_reduce(False)
                model(x, y).backward()
                root.set_requires_all_reduce(True)
                if first and m == 0:
                    info["clean_pass_collectives"] = since(c0)
                if mode == "global":
                    g = [p.grad.to_local() for p in params]
                    if first and m == 0:
                        info["grad_placements"] = str(params[0].grad.placements)
                        n_shard = shard_norm([p.grad for p in params], shard_pg)
                        loc = torch.stack(torch._foreach_norm(g, 2, dtype=torch.float32)).pow(2).sum()
                        dist.all_reduce(loc)
                        dn = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
                        dn = dn.full_tensor() if isinstance(dn, DTensor) else dn
                        info["norm_shard_group"] = n_shard.item()
                        info["norm_all_ranks_wrong"] = loc.sqrt().item()
                        info["norm_dtensor_full_tensor"] = dn.item()
                    for p in params:
                        p.grad = None
                else:
                    if first and m == 0:
                        info["grad_none_after_partial_backward"] = all(p.grad is None for p in params)
                    g = take_partial_reduce_output(model, params)
                c1 = dict(counts)
                norm = shard_norm(g, shard_pg)
                if first and m == 0:
                    info["norm_collectives"] = since(c1)
                e = [t * (RHO / (norm + EPS)) for t in g]
                locs = [p.to_local() for p in params]
                saved = torch._foreach_clone([t.detach() for t in locs])
                with torch.no_grad():
                    torch._foreach_add_(locs, e)
                for mm in fsdp_modules(model):
                    mm.reshard()
                c2 = dict(counts)
                (model(x, y) * scale_loss).backward()
                if first and m == 0:
                    info["descent_pass_collectives"] = since(c2)
                with torch.no_grad():
                    torch._foreach_copy_([p.to_local() for p in params], saved)
                if first and m == 0:
                    info["restore_bitexact"] = all(torch.equal(p.to_local(), t) for p, t in zip(params, saved))
                if stash is not None:
                    for p, t in zip(params, stash):
                        p.grad.to_local().add_(t.to_local())
            elif mode in ("device", "group_unsharded"):
                stash = None
                if m > 0:
                    stash = [p.grad for p in params]
                    for p in params:
                        p.grad = None
                root.set_requires_gradient_sync(False)
                root.set_reshard_after_backward(False)
                model(x, y).backward()
                by_id = fsdp_params_by_id(model)
                held = [by_id[id(p)][1] for p in params]
                unsh = [fp.unsharded_param for fp in held]
                g = [u.grad for u in unsh]
                for u in unsh:
                    u.grad = None
                c1 = dict(counts)
                if mode == "group_unsharded":
                    flat = torch.cat([t.reshape(-1) for t in g])
                    dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=shard_pg)
                    g = [t.view_as(u) for t, u in zip(flat.split([u.numel() for u in unsh]), unsh)]
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g, 2, dtype=torch.float32)))
                if first and m == 0:
                    info["clean_pass_collectives"] = since(c0)
                    info["ascent_reduce_collectives"] = since(c1)
                    info["unsharded_numel_held"] = sum(u.numel() for u in unsh)
                    info["sharded_numel_local"] = sum(p.to_local().numel() for p in params)
                torch._foreach_mul_(g, RHO / (norm + EPS))
                with torch.no_grad():
                    torch._foreach_add_(unsh, g)
                del g
                root.set_requires_gradient_sync(True)
                root.set_reshard_after_backward(True)
                root.set_reshard_after_forward(False)
                c2 = dict(counts)
                (model(x, y) * scale_loss).backward()
                if first and m == 0:
                    info["descent_pass_collectives"] = since(c2)
                # back to the defaults: blocks reshard after forward, the root does not
                root.set_reshard_after_forward(True)
                root.set_reshard_after_forward(False, recurse=False)
                if stash is not None:
                    for p, t in zip(params, stash):
                        p.grad.to_local().add_(t.to_local())
        opt.step()
        opt.zero_grad()

    for s in range(steps_a):
        c0 = dict(counts)
        one_step(s, s == 1)
        if s == 0:
            info["collectives_step0_total"] = since(c0)
    if resume:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        ck = f"/tmp/probe/ckpt_hsdp_{mode}_{opt_kind}_{ga}_{tag}"
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ck)
        _, model = build()
        params = list(model.parameters())
        root = model
        opt = make_opt(params, opt_kind)
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=ck)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        for s in range(steps_a, STEPS):
            one_step(s, False)
    full = [p.full_tensor() for p in params]
    if rank == 0 and tag:
        torch.save([t.detach().clone() for t in full], f"/tmp/probe/weights_{tag}_{info['case'].replace(':', '_')}.pt")
    refmode = {"global": "global", "group_rs": "group", "group_unsharded": "group", "device": "device",
               "plain": "plain"}[mode]
    ref, _ = sam_reference(init, STEPS, world, refmode, opt_kind, ga=ga, group_size=S)
    info["max_dev_vs_ref"] = max_dev(full, ref)
    for other in ("global", "group", "device"):
        if other != refmode:
            o, _ = sam_reference(init, STEPS, world, other, opt_kind, ga=ga, group_size=S)
            info[f"max_dev_vs_{other}_ref"] = max_dev(full, o)
    return info


tag = sys.argv[2] if len(sys.argv) > 2 else ""
t0 = time.time()
for c in sys.argv[1].split(","):
    parts = c.split(":")
    try:
        res = run_case(parts[0], parts[1], int(parts[2]), len(parts) > 3 and parts[3] == "resume", tag)
    except Exception as ex:
        res = {"case": c, "error": f"{type(ex).__name__}: {str(ex)[:500]}", "tb": traceback.format_exc()[-1500:]}
    if rank == 0:
        print("RESULT", json.dumps(res), flush=True)
if rank == 0:
    print("WALL_INSIDE", round(time.time() - t0, 2), flush=True)
dist.barrier()
dist.destroy_process_group()
