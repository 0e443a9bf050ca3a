"""Item 5: SAM under FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), 2 gloo processes.

argv[1]: comma-separated cases: global | device | plain | global_rbf16 (reduce_dtype=bf16 too).
Reference (single process, written from what the policy means): fp32 master weights w; each pass runs the model
on bf16 copies of the (perturbed) weights, per rank on its rows; the bf16 gradients are cast to fp32 and
averaged over ranks in fp32 (global ascent: the ascent gradient is that mean; norm in fp32; e in fp32 added to
the fp32 shards, cast to bf16 at the all-gather). Per-device: each rank's ascent uses its own bf16 gradient
and perturbs FSDP's bf16 unsharded parameters (e computed in bf16 from the bf16 gradient, norm in fp32).
"""
import copy, json, os, sys, time, traceback
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard, FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor
from pcommon import tiny, data, rank_slice, max_dev, RHO, LR, EPS

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
PER, STEPS = 4, 3
BF = torch.bfloat16


def reference(init, mode):
    w = [p.detach().clone() for p in init.parameters()]
    net = copy.deepcopy(init).to(BF)
    bp = list(net.parameters())

    def grad_at(ws, x, y):  # bf16 forward/backward at weights ws (fp32 or bf16 list)
        with torch.no_grad():
            for p, t in zip(bp, ws):
                p.copy_(t.to(BF))
        g = torch.autograd.grad(net(x.to(BF), y.to(BF)), bp)
        return g  # bf16

    for s in range(STEPS):
        x, y = data(s, 0, world, PER)
        chunks = [(rank_slice(x, r, PER), rank_slice(y, r, PER)) for r in range(world)]
        if mode == "plain":
            d = [sum(grad_at(w, *c)[i].float() for c in chunks) / world for i in range(len(w))]
        elif mode == "global":
            g = [sum(grad_at(w, *c)[i].float() for c in chunks) / world for i in range(len(w))]
            norm = torch.linalg.vector_norm(torch.stack([t.norm() for t in g]))
            we = [a + t * (RHO / (norm + EPS)) for a, t in zip(w, g)]
            d = [sum(grad_at(we, *c)[i].float() for c in chunks) / world for i in range(len(w))]
        else:  # device
            acc = [torch.zeros_like(t) for t in w]
            for c in chunks:
                gb = grad_at(w, *c)
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(gb), 2, dtype=torch.float32)))
                eb = [t * (RHO / (norm + EPS)) for t in gb]  # bf16
                wb = [a.to(BF) + t for a, t in zip(w, eb)]
                dd = grad_at(wb, *c)
                acc = [a + t.float() for a, t in zip(acc, dd)]
            d = [a / world for a in acc]
        w = [a - LR * t for a, t in zip(w, d)]
    return w


def run(case):
    info = {"case": case}
    init = tiny()
    model = copy.deepcopy(init)
    rd = BF if case == "global_rbf16" else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=BF, reduce_dtype=rd)
    fully_shard(model.fc1, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR)
    mode = "global" if case.startswith("global") else case
    for s in range(STEPS):
        x, y = data(s, 0, world, PER)
        x, y = rank_slice(x, rank, PER), rank_slice(y, rank, PER)
        if mode == "plain":
            model(x, y).backward()
        elif mode == "global":
            model(x, y).backward()
            g = [p.grad.to_local() for p in params]
            if s == 0:
                info["sharded_param_dtype"] = str(params[0].dtype)
                info["sharded_grad_dtype"] = str(g[0].dtype)
            for p in params:
                p.grad = None
            loc = torch.stack(torch._foreach_norm(g, 2, dtype=torch.float32)).pow(2).sum()
            dist.all_reduce(loc)
            norm = loc.sqrt()
            if s == 0:
                info["norm_dtype"] = str(norm.dtype)
            e = [t * (RHO / (norm + EPS)) for t in g]
            locs = [p.to_local() for p in params]
            saved = torch._foreach_clone([t.detach() for t in locs])
            with torch.no_grad():
                torch._foreach_add_(locs, e)
            for m in model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()
            model(x, y).backward()
            with torch.no_grad():
                torch._foreach_copy_([p.to_local() for p in params], saved)
            if s == 0:
                info["restore_bitexact_fp32_shards"] = all(torch.equal(p.to_local(), t) for p, t in zip(params, saved))
        else:  # device
            model.set_requires_gradient_sync(False)
            model.set_reshard_after_backward(False)
            model(x, y).backward()
            fps = {}
            for m in model.modules():
                if isinstance(m, FSDPModule):
                    for grp in m._get_fsdp_state()._fsdp_param_groups:
                        for fp in grp.fsdp_params:
                            fps[id(fp.sharded_param)] = fp
            held = [fps[id(p)] for p in params]
            unsh = [fp.unsharded_param for fp in held]
            if s == 0:
                info["unsharded_param_dtype"] = str(unsh[0].dtype)
                info["unsharded_grad"] = [None if u.grad is None else str(u.grad.dtype) for u in unsh]
                info["unsharded_accumulated_grad"] = [None if fp.unsharded_accumulated_grad is None else
                                                      str(fp.unsharded_accumulated_grad.dtype) for fp in held]
            g = []
            for fp, u in zip(held, unsh):
                if fp.unsharded_accumulated_grad is not None:
                    g.append(fp.unsharded_accumulated_grad.to(u.dtype)); fp.unsharded_accumulated_grad = None
                else:
                    g.append(u.grad)
                u.grad = None
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g, 2, dtype=torch.float32)))
            torch._foreach_mul_(g, RHO / (norm + EPS))
            shards_before = [p.to_local().clone() for p in params]
            with torch.no_grad():
                torch._foreach_add_(unsh, g)
            model.set_requires_gradient_sync(True)
            model.set_reshard_after_backward(True)
            model.set_reshard_after_forward(False)
            model(x, y).backward()
            model.set_reshard_after_forward(True)
            model.set_reshard_after_forward(False, recurse=False)
            if s == 0:
                info["fp32_shards_untouched"] = all(torch.equal(p.to_local(), t) for p, t in zip(params, shards_before))
        opt.step()
        opt.zero_grad()
    full = [p.full_tensor() for p in params]
    for rm in ("global", "device", "plain"):
        info[f"max_dev_vs_{rm}_ref"] = max_dev(full, type("M", (), {"parameters": lambda self, r=reference(init, rm): r})())
    return info


t0 = time.time()
for c in sys.argv[1].split(","):
    try:
        res = run(c)
    except Exception as ex:
        res = {"case": c, "error": f"{type(ex).__name__}: {str(ex)[:600]}", "tb": traceback.format_exc()[-2000:]}
    if rank == 0:
        print("RESULT", json.dumps(res), flush=True)
if rank == 0:
    print("WALL_INSIDE", round(time.time() - t0, 2), flush=True)
dist.barrier()
dist.destroy_process_group()
