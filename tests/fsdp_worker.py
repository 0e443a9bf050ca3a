"""Run by test_fsdp.py under `torchrun --nproc_per_node 2` (CPU, gloo): SAMTrainer on FSDP2.

    python fsdp_worker.py OUT_DIR CHECK [CHECK ...]

Each CHECK trains a tiny GPT-2 (vocabulary 101: the embedding shards unevenly, 51 + 50 rows) with a
SAMTrainer forced onto FSDP2 and compares the weights with a single-process reference written from
the papers' equations in plain torch (below). Rank 0 writes OUT_DIR/fsdp_<CHECK>.json per check.

Test-only harness: accelerate does not put the Trainer on FSDP on a CPU, so `ForcedFSDP2` sets the
FSDP2 plugin on the accelerator state after the accelerator is created (and in PartialState's
shared state, which AcceleratorState re-reads; without it the run reverts to MULTI_CPU mid-training).
"""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.data import Dataset

HERE = os.path.dirname(os.path.abspath(__file__))
import tiny  # noqa: E402
from hf_sam_scripts.collectives import COUNTS, force_fsdp2, install_counters  # noqa: E402

VOCAB, SEQ, PER, LR = 101, 16, 4, 0.1
SCALE = (SEQ - 1) / SEQ  # the Trainer's GPT-2 loss: num_items_in_batch counts the unshifted labels

class Ids(Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(1234)
        self.rows = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class ForcedFSDP2(tiny.InOrderSAMTrainer):
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        force_fsdp2(self)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append(inputs["input_ids"].tolist())
        before = dict(COUNTS)
        out = super().training_step(model, inputs, num_items_in_batch)
        self.collectives.append({k: COUNTS[k] - before[k] for k in COUNTS})
        return out


def model():
    return tiny.gpt2(width=32, tie=True, vocab_size=VOCAB, n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)


def train(out, steps, ga, resume=None, save_steps=None, cls=None, **sam):
    init = model()
    kw = dict(gradient_accumulation_steps=ga, max_steps=steps, per_device_train_batch_size=PER, learning_rate=LR,
              fsdp="full_shard", fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"],
                                              "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"})
    if save_steps:
        kw.update(save_strategy="steps", save_steps=save_steps)
    kw.update(sam)
    tr = (cls or ForcedFSDP2)(model=copy.deepcopy(init), args=tiny.args(out, **kw), train_dataset=Ids(2 * PER * ga * 8))
    tr.seen, tr.collectives = [], []
    tr.train(resume_from_checkpoint=resume)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, tr.seen)
    return init, tr, gathered


def full(p):
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach()


class SimpleModel:  # what `deviation` reads: .model
    def __init__(self, m):
        self.model = m


def deviation(tr, ref):
    return max((full(p) - q).abs().max().item() for p, q in zip(tr.model.parameters(), ref.parameters()))


# ---- single-process references: the variants' equations in plain torch ------------------------------
def loss(m, ids):
    return m(input_ids=ids, labels=ids).loss * SCALE


def grads(m, ids):
    return list(torch.autograd.grad(loss(m, ids), list(m.parameters())))


def norm(v):
    return torch.sqrt(sum((x.double() ** 2).sum() for x in v)).float()


def dot(a, b):
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b)).float()


def at(m, e, fn):
    """fn() evaluated at w + e, weights put back after."""
    saved = [p.detach().clone() for p in m.parameters()]
    with torch.no_grad():
        for p, x in zip(m.parameters(), e):
            p.add_(x)
    try:
        return fn()
    finally:
        with torch.no_grad():
            for p, x in zip(m.parameters(), saved):
                p.copy_(x)


def gaussian(m, seed, step, micro, rank):
    """The documented noise scheme (hf_sam.variants.common): a generator seeded with
    noise_seed(seed, step, micro, rank), one N(0, 1) draw per parameter in named_parameters() order."""
    from hf_sam.variants.common import noise_seed

    gen = torch.Generator().manual_seed(noise_seed(seed, step, micro, rank))
    return [torch.randn(p.shape, generator=gen, dtype=torch.float32) for p in m.parameters()]


def direction(variant, m, ids, cfg, state, step, micro=0, rank=0, seed=0):
    """The descent gradient of one micro-batch (one rank's in per-device mode, the union in global mode).
    micro, rank, seed: what the noise of rsam / rwp is drawn with (rank 0 in global mode: one weight vector)."""
    rho, eps = cfg["sam_rho"], 1e-12
    if variant == "rsam":  # R-SAM: the ascent gradient at w + delta, delta ~ N(0, sigma^2)
        delta = [cfg["sam_rsam_sigma"] * z for z in gaussian(m, seed, step, micro, rank)]
        gt = at(m, delta, lambda: grads(m, ids))
        e = [x + rho * y / (norm(gt) + eps) for x, y in zip(delta, gt)]
        return at(m, e, lambda: grads(m, ids))
    g = grads(m, ids)
    if variant == "rwp":  # RWP: (1 - alpha) g(w) + alpha g(w + xi), xi filter-wise N(0, (gamma ||w_row||)^2)
        alpha, gamma = cfg["sam_rwp_alpha"], cfg["sam_rwp_gamma"]
        xi = []
        for z, p in zip(gaussian(m, seed, step, micro, rank), m.parameters()):
            w = p.detach()
            if w.dim() > 1:
                xi.append(z * gamma * w.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (w.dim() - 1)))
            else:
                xi.append(z * gamma * (w.norm() + 1e-16))
        gn = at(m, xi, lambda: grads(m, ids))
        return [(1 - alpha) * x + alpha * y for x, y in zip(g, gn)]
    if variant == "sam":
        return at(m, [rho * x / (norm(g) + eps) for x in g], lambda: grads(m, ids))
    if variant == "asam":
        eta = 0.01
        t = [(p.detach().abs() + eta) if n.endswith("weight") else torch.ones_like(p)
             for n, p in m.named_parameters()]
        tg = [a * x for a, x in zip(t, g)]
        return at(m, [rho * a * y / (norm(tg) + eps) for a, y in zip(t, tg)], lambda: grads(m, ids))
    if variant == "gsam":
        alpha = cfg["sam_gsam_alpha"]
        ga = at(m, [rho * x / (norm(g) + eps) for x in g], lambda: grads(m, ids))
        u = [x / (norm(ga) + eps) for x in ga]
        par = dot(g, u)
        return [a - alpha * (x - par * y) for a, x, y in zip(ga, g, u)]  # g_adv - alpha * g_perp
    if variant == "looksam":
        k, alpha = cfg["sam_looksam_k"], cfg["sam_looksam_alpha"]
        if "gv" not in state or step % k == 0:
            gs = at(m, [rho * x / (norm(g) + eps) for x in g], lambda: grads(m, ids))
            c = dot(g, gs) / norm(g) ** 2
            state["gv"] = [a - c * x for a, x in zip(gs, g)]
            return gs
        gv = state["gv"]
        return [x + alpha * norm(g) / (norm(gv) + eps) * v for x, v in zip(g, gv)]
    if variant == "fsam":
        sigma, lam = cfg["sam_fsam_sigma"], cfg["sam_fsam_lambda"]
        mm = state.get("m")
        d = g if mm is None else [x - sigma * y for x, y in zip(g, mm)]
        state["m"] = [x.clone() for x in g] if mm is None else [lam * y + (1 - lam) * x for x, y in zip(g, mm)]
        return at(m, [rho * x / (norm(d) + eps) for x in d], lambda: grads(m, ids))
    raise ValueError(variant)


def reference(init, seen, ga, mode, variant, cfg, seed=0):
    """SGD on the Trainer's windows; global: SAM on the union of the ranks' i-th micro-batches."""
    m = copy.deepcopy(init)
    states = [{} for _ in seen]  # a variant's state is per device (one in global mode)
    steps = len(seen[0]) // ga
    for s in range(steps):
        total = [torch.zeros_like(p) for p in m.parameters()]
        for i in range(s * ga, (s + 1) * ga):
            chunks = [torch.tensor(r[i]) for r in seen]
            if mode == "global":
                chunks = [torch.cat(chunks)]
            elif mode == "node":  # HSDP's shard groups: ranks {0, 1}, {2, 3}
                chunks = [torch.cat(chunks[k:k + 2]) for k in range(0, len(chunks), 2)]
            for rank, (c, state) in enumerate(zip(chunks, states)):
                d = direction(variant, m, c, cfg, state, s, micro=i - s * ga, rank=rank, seed=seed)
                total = [t + x / (ga * len(chunks)) for t, x in zip(total, d)]
        with torch.no_grad():
            for p, t in zip(m.parameters(), total):
                p.sub_(LR * t)
    return m


# ---- bf16 under FSDP2 (MixedPrecisionPolicy): a tiny MLP, hf_sam.SAM, global ascent ---------------------
class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(7, 13), torch.nn.Linear(13, 5)  # 13 rows: shards 7 + 6

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.fc2(torch.tanh(self.fc1(x))), y)


def mlp_batch(step, world):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(world * PER, 7, generator=g), torch.randn(world * PER, 5, generator=g)


def bf16_reference(init, world, steps, rho=0.5, eps=1e-12):
    """Each rank's forward/backward in bf16 at bf16 copies of the fp32 weights; the gradients averaged in
    fp32 (reduce_dtype); the ascent norm in fp32; w + e formed in fp32; SGD on fp32 weights."""
    w = [p.detach().clone() for p in init.parameters()]
    net = copy.deepcopy(init).to(torch.bfloat16)

    def grad(ws, x, y):
        with torch.no_grad():
            for p, t in zip(net.parameters(), ws):
                p.copy_(t.to(torch.bfloat16))
        return [t.float() for t in torch.autograd.grad(net(x.bfloat16(), y.bfloat16()), list(net.parameters()))]

    for s in range(steps):
        x, y = mlp_batch(s, world)
        chunks = [(x[r * PER:(r + 1) * PER], y[r * PER:(r + 1) * PER]) for r in range(world)]
        mean = lambda ws: [sum(t) / world for t in zip(*[grad(ws, *c) for c in chunks])]  # noqa: E731
        g = mean(w)
        we = [a + rho * t / (norm(g) + eps) for a, t in zip(w, g)]
        w = [a - LR * t for a, t in zip(w, mean(we))]
    return w


def bf16_check(steps=3):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import hf_sam

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    init, res = MLP(), {}
    for lr in (LR, 0.0):
        m = copy.deepcopy(init)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        fully_shard(m.fc1, mp_policy=mp)
        fully_shard(m, mp_policy=mp)
        opt = hf_sam.SAM(m.named_parameters(), torch.optim.SGD, config=hf_sam.SAMConfig(rho=0.5, eps=1e-12),
                         model=m, lr=lr)
        for s in range(steps):
            x, y = (t[rank * PER:(rank + 1) * PER] for t in mlp_batch(s, world))

            def closure():
                value = m(x, y)
                value.backward()
                return value

            opt.step(closure)
            opt.zero_grad()
        if lr == 0:  # the fp32 shards come back bit for bit after every step
            res["restored_bitwise"] = all(torch.equal(full(p), q.detach()) for p, q in zip(m.parameters(),
                                                                                           init.parameters()))
        else:
            res["shard_dtype"] = str(next(m.parameters()).dtype)
            ref = bf16_reference(init, world, steps)
            res["dev_vs_bf16_ref"] = max((full(p) - q).abs().max().item() for p, q in zip(m.parameters(), ref))
            plain = bf16_reference(init, world, steps, rho=0.0)  # the test tells SAM from the plain step
            res["dev_vs_plain"] = max((full(p) - q).abs().max().item() for p, q in zip(m.parameters(), plain))
    return res


# ---- the checks -----------------------------------------------------------------------------------
VARIANT_CFG = {
    "sam": {},
    "asam": {"sam_variant": "asam", "sam_rho": 1.0},
    "gsam": {"sam_variant": "gsam", "sam_gsam_alpha": 0.4},
    "looksam": {"sam_variant": "looksam", "sam_looksam_k": 2, "sam_looksam_alpha": 0.7},
    "fsam": {"sam_variant": "fsam", "sam_fsam_sigma": 1.0, "sam_fsam_lambda": 0.9},
    "rsam": {"sam_variant": "rsam", "sam_rsam_sigma": 0.05},
    "rwp": {"sam_variant": "rwp", "sam_rho": 0.05, "sam_rwp_alpha": 0.5, "sam_rwp_gamma": 0.05},  # no radius: default rho
}


def closure_run(out, variant, mode, ga, with_model=True, steps=3):
    """hf_sam.SAM around SGD on a GPT-2 sharded with fully_shard (blocks, then the root) before the
    optimizer is built; rank r trains on its own micro-batches. Returns (init, model, seen, warnings)."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    import hf_sam

    init = model()
    m = copy.deepcopy(init)
    for block in m.transformer.h:
        fully_shard(block)
    fully_shard(m)
    cfg = {"sam_rho": 0.5, **VARIANT_CFG[variant]}
    sam = {k[len("sam_"):]: v for k, v in cfg.items()}
    if mode == "local":
        sam["sync_ascent"] = False
    rows, world, rank = Ids(steps * ga * 2 * PER).rows, dist.get_world_size(), dist.get_rank()
    seen = [[rows[(i * world + r) * PER:(i * world + r + 1) * PER].tolist() for i in range(steps * ga)]
            for r in range(world)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = hf_sam.SAM(m.named_parameters(), torch.optim.SGD, config=hf_sam.SAMConfig(**sam),
                         model=m if with_model else None, lr=LR)
        for s in range(steps):
            for i in range(ga):
                ids = torch.tensor(seen[rank][s * ga + i])

                def closure():
                    value = loss(m, ids) / ga
                    value.backward()
                    return value

                opt.accumulate(closure) if i < ga - 1 else opt.step(closure)
            opt.zero_grad()
        metrics = opt.metrics()
    return init, m, seen, [str(w.message) for w in caught], metrics


def check(name, out):
    res = {}
    if name == "resume":  # F-SAM keeps a per-parameter EMA in sam_state: a sharded tensor under FSDP
        cfg = {"sam_rho": 0.5, **VARIANT_CFG["fsam"]}
        _, full_run, _ = train(os.path.join(out, "full"), 4, 1, **cfg)
        _, first, _ = train(os.path.join(out, "part"), 2, 1, save_steps=2, **cfg)
        _, resumed, _ = train(os.path.join(out, "part"), 4, 1, resume=os.path.join(out, "part", "checkpoint-2"),
                              **cfg)
        res["resume_vs_uninterrupted"] = max((full(p) - full(q)).abs().max().item() for p, q in
                                             zip(resumed.model.parameters(), full_run.model.parameters()))
        res["ckpt_files"] = sorted(os.listdir(os.path.join(out, "part", "checkpoint-2")))
        res["first_run_moved"] = max((full(p) - full(q)).abs().max().item() for p, q in
                                     zip(first.model.parameters(), full_run.model.parameters()))
        return res
    if name == "restored":  # learning rate 0: after the SAM steps the weights must be w, bit for bit
        for sync in (True, False):
            init, tr, _ = train(os.path.join(out, f"restored{int(sync)}"), 2, 1, learning_rate=0.0,
                                sam_sync_ascent=sync)
            res[f"sync{int(sync)}_bitwise_equal"] = all(torch.equal(full(p), q.detach()) for p, q in
                                                        zip(tr.model.parameters(), init.parameters()))
        return res
    if name == "ops":  # sharded norms and inner products, with a replicated tensor in the list (counts once)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        from hf_sam import ops

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        g = torch.Generator().manual_seed(7)
        a, b, c = torch.randn(101, 3, generator=g), torch.randn(101, 3, generator=g), torch.randn(5, generator=g)
        da, db = distribute_tensor(a, mesh, [Shard(0)]), distribute_tensor(b, mesh, [Shard(0)])
        norm = ops.global_norm([da, c])
        dot = ops.global_dot([da, c], [db, c])
        return {"norm_err": (norm - torch.sqrt((a ** 2).sum() + (c ** 2).sum())).abs().item(),
                "dot_err": (dot - ((a * b).sum() + (c * c).sum())).abs().item(),
                "plain_result": not ops.is_sharded(norm) and not ops.is_sharded(dot)}
    if name == "cpu_asked_fsdp":  # no forcing: on a CPU accelerate sets up DDP although FSDP was asked for
        try:
            tiny.InOrderSAMTrainer(model=model(), args=tiny.args(os.path.join(out, name), fsdp="full_shard",
                                                                 fsdp_config={"fsdp_version": 2}),
                                   train_dataset=Ids(8))
            res["refused"] = None
        except ValueError as err:
            res["refused"] = str(err)
        return res
    if name == "bf16":
        return bf16_check()
    if name.startswith("closure_"):  # hf_sam.SAM on fully_shard modules, e.g. closure_sam_global_2[_nomodel]
        if name == "closure_refuse_local_nomodel":
            try:
                closure_run(os.path.join(out, name), "sam", "local", 1, with_model=False, steps=1)
                return {"refused": None}
            except ValueError as err:
                return {"refused": str(err)}
        parts = name.split("_")
        variant, mode, ga = parts[1], parts[2], int(parts[3])
        init, m, seen, caught, metrics = closure_run(out, variant, mode, ga, with_model=not name.endswith("nomodel"))
        res["warnings"] = caught
        res["metrics"] = metrics
        res["sharded"] = all(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in m.parameters())
        cfg = {"sam_rho": 0.5, **VARIANT_CFG[variant]}
        for ref_mode in ("global", "local"):
            res[f"dev_vs_{ref_mode}"] = deviation(SimpleModel(m), reference(init, seen, ga, ref_mode, variant, cfg))
        return res
    variant, mode, ga = name.split("_")  # e.g. sam_global_2
    ga = int(ga)
    cfg = {"sam_rho": 0.5, **VARIANT_CFG[variant]}
    sam = dict(cfg)
    if mode == "local":
        sam["sam_sync_ascent"] = False
    elif mode == "global" and variant != "sam":
        sam["sam_sync_ascent"] = True  # plain sam: leave it unset, FSDP's default is global ascent
    init, tr, seen = train(os.path.join(out, name), 3, ga, **sam)
    res["sync_ascent"] = tr.sam_config.sync_ascent
    res["sharded"] = all(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in tr.model.parameters())
    res["wte_local_rows"] = tr.model.transformer.wte.weight.to_local().shape[0]
    res["collectives_per_micro_batch"] = tr.collectives[:ga]
    for ref_mode in ("global", "local"):
        if variant in ("sam", "asam", "fsam", "rwp") or ref_mode == mode:
            res[f"dev_vs_{ref_mode}"] = deviation(tr, reference(init, seen, ga, ref_mode, variant, cfg))
    res["distinct_micro_batches"] = len({json.dumps(mb) for r in seen for mb in r})
    return res


# ---- running checks in one process pair, and launching that from a test -------------------------------
def run_checks(check, prefix):
    """Each name on the command line: check(name, out) -> dict, written by rank 0 to out/<prefix>_<name>.json."""
    out, names = sys.argv[1], sys.argv[2:]
    for name in names:
        try:
            res = check(name, out)
        except Exception as err:  # reported, so the test shows what failed
            import traceback

            res = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-3000:]}
        if dist.get_rank() == 0:
            with open(os.path.join(out, f"{prefix}_{name}.json"), "w") as f:
                json.dump(res, f)
            print("RESULT", name, json.dumps(res), flush=True)
    dist.barrier()
    os._exit(0)  # gloo sometimes aborts in the interpreter's teardown (see ddp_worker.py)


class Results(dict):
    """A check's result; a check that raised fails the test that reads it, with its traceback."""

    def __getitem__(self, name):
        res = super().__getitem__(name)
        assert "error" not in res, f"{name}: {res.get('error')}\n{res.get('trace')}"
        return res


def launch(worker, out, names, port, prefix, env=None, timeout=300, nproc=2):
    """Run `worker` under torchrun with `nproc` CPU processes; the checks' results by name."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           os.path.join(HERE, worker), str(out), *names]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return Results({name: json.load(open(os.path.join(out, f"{prefix}_{name}.json"))) for name in names})


if __name__ == "__main__":
    install_counters()
    run_checks(check, "fsdp")
