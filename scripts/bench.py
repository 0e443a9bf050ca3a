"""Benchmark: SAMTrainer (each variant) vs the stock Trainer and the SAM a user would write instead.

Every configuration trains for the same number of steps on the same batches (synthetic for the
ViT and GPT-2; the studies' digits MLP, 64-256-256-10, on sklearn's digits), each in a fresh child
process; the configurations of a table run back to back in one round, and the rounds repeat
(default 3). Time: the mean optimizer-step time of a run after the warm-up steps (a mean, so that
LookSAM's refresh every k-th step counts at its share); "x stock" is the median over rounds of the
per-round ratio to the stock Trainer (min-max beside it), so slow phases of a shared machine hit
both sides of a ratio. Threads: every child uses the same intra-op thread count, chosen once per
bench (`--threads`, default: the cores this process may use, less the machine's load, divided by
the processes a run starts; one thread each when several run), and printed in the header.

Configurations are variant names (each at its defaults) or one of the named settings in CONFIGS:
`looksam_reuse` (LookSAM between refreshes: k so large that only the warm-up step refreshes) and
`looksam_paper` (LookSAM with the paper's reuse rule, alpha 0.7).

Memory: on the last step of each run (not timed), the peak bytes of live tensors during the step
(training_step(s), clipping, optimizer step). On a CPU: the tensors alive when the step starts
(weights, optimizer and variant state, found by the garbage collector) + the peak of the tensors the
step allocates and holds at the same time (a dispatch-level tracker, hf_sam_scripts/memtrack.py); on a GPU:
the allocator's peak. "extra copies" is that peak minus the stock Trainer's, in copies of the
trainable parameters (with LoRA: of the adapters) - plain SAM needs 1; persistent state (an EMA, an
SWA average) counts too.

Peers: `pytorch_optimizer.SAM` around the Trainer's own AdamW (first_step / second_step around the
stock training_step, wired into a Trainer subclass), and a loop-style SAM (a per-parameter Python
loop with `p.data` copies, the common one-file SAM), both at rho 0.05 like SAMTrainer. Wired this way
they are SAM only without gradient accumulation (first_step zeroes the window's earlier gradients),
so their rows say n/a with --ga above 1.

    python scripts/bench.py                          # tiny ViT and GPT-2, sam and asam, on CPU
    python scripts/bench.py --models anchor --variants sam --peers --steps 8 --repeats 3
    python scripts/bench.py --models vit --variants all --steps 12   # each variant vs its passes
    python scripts/bench.py --models gpt2 --variants sam --ga 4      # also --compile, --lora, --ddp
    python scripts/bench.py --suite                  # every table of issue 11 (long on a CPU)
    python scripts/bench.py --cheap                  # the cheap-SAM tables (ViT, digits MLP, anchor)
    python scripts/bench.py --device cuda --preset large --bf16 --peers --out bench.json

A benchmark, not a test: numbers depend on the machine.
"""

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

_ANCHOR = dict(n_embd=256, n_layer=4, n_head=4, n_positions=128, vocab_size=50257, seq=128, batch=8)
PRESETS = {
    "tiny": {
        "vit": dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, num_labels=10, batch=32),
        "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=512, seq=128, batch=8),
        "anchor": _ANCHOR,  # GPT-2 4 layers x 256, GPT-2's vocabulary, sequence 128, batch 8
        "mlp": dict(width=256, depth=2, batch=32),  # the label_noise / mupp_transfer studies' digits MLP
    },
    "large": {  # ViT-B/16 at 224 px and GPT-2 124M at sequence length 1024
        "vit": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, num_labels=1000, batch=64),
        "gpt2": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257, seq=1024, batch=8),
        "anchor": _ANCHOR,
        "mlp": dict(width=256, depth=2, batch=32),
    },
}
PEERS = {"pto": "pytorch_optimizer.SAM", "loop": "loop SAM"}
RHO = 0.05
# named configurations: (variant, SAMConfig settings)
CONFIGS = {
    "looksam_reuse": ("looksam", {"looksam_k": 10**9}),  # only the first (warm-up) step refreshes
    "looksam_paper": ("looksam", {"looksam_alpha": 0.7}),
}


def variant_of(config):
    """(variant, settings) of a bench configuration."""
    return CONFIGS.get(config, (config, {}))


def default_threads(processes=1):
    """Intra-op threads per child process: the scripts' choice (hf_sam_scripts.threads): OMP_NUM_THREADS
    when set, else the cores this process may use less the machine's load, shared among the processes
    a run starts; at least 1."""
    from hf_sam_scripts.threads import choose_threads

    return choose_threads(processes=processes)


# ---- models and data ---------------------------------------------------------------------------
def _study_module(name):
    """benchmarks/studies/<name>.py of this checkout, loaded by its path (it imports only packages)."""
    import importlib.util

    path = os.path.join(ROOT, "benchmarks", "studies", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"hf_sam_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(model_name, spec, ga=1):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

    spec = dict(spec)
    batch = spec.pop("batch")
    g = torch.Generator().manual_seed(0)
    n = batch * ga * 4
    if model_name == "mlp":
        digits = _study_module("digits")
        MLP, load_digits_split = digits.MLP, digits.load_digits_split

        x, y = load_digits_split(0.0, 0)[:2]
        model = MLP(**spec)
        data = [{"x": torch.as_tensor(x[i]), "labels": torch.tensor(int(y[i])), "sample_index": i}
                for i in range(len(y))]
    elif model_name == "vit":
        model = ViTForImageClassification(ViTConfig(**spec))
        data = [{"pixel_values": torch.randn(3, spec["image_size"], spec["image_size"], generator=g),
                 "labels": torch.randint(0, spec["num_labels"], (), generator=g), "sample_index": i}
                for i in range(n)]
    else:
        seq = spec.pop("seq")
        model = GPT2LMHeadModel(GPT2Config(**spec))
        data = []
        for _ in range(n):
            ids = torch.randint(0, spec["vocab_size"], (seq,), generator=g)
            data.append({"input_ids": ids, "labels": ids.clone()})
    return model, data, batch


def add_lora(model, model_name):
    from peft import LoraConfig, get_peft_model

    targets = ["c_attn"] if model_name != "vit" else ["query", "value"]
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))


# ---- the peers: SAM as users wire it into a Trainer ----------------------------------------------
def loop_sam_class():
    import torch

    class LoopSAM(torch.optim.Optimizer):
        """The common one-file SAM: a per-parameter loop, `p.data` copies kept per parameter."""

        def __init__(self, params, base_cls, rho=RHO, **kwargs):
            super().__init__(params, dict(rho=rho, **kwargs))
            self.base_optimizer = base_cls(self.param_groups, **kwargs)
            self.param_groups = self.base_optimizer.param_groups
            self.defaults.update(self.base_optimizer.defaults)

        @torch.no_grad()
        def first_step(self, zero_grad=False):
            grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
            grad_norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
            for group in self.param_groups:
                scale = group["rho"] / (grad_norm + 1e-12)
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    self.state[p]["old_p"] = p.data.clone()
                    e_w = p.grad * scale.to(p)
                    p.add_(e_w)
            if zero_grad:
                self.zero_grad()

        @torch.no_grad()
        def second_step(self, zero_grad=False):
            for group in self.param_groups:
                for p in group["params"]:
                    if "old_p" in self.state[p]:
                        p.data = self.state[p].pop("old_p")
            self.base_optimizer.step()
            if zero_grad:
                self.zero_grad()

        def step(self, closure=None):  # the Trainer calls step() after clipping: restore w, then AdamW
            self.second_step()

    return LoopSAM


def peer_trainer_class():
    """A Trainer whose optimizer is a SAM wrapper around the Trainer's own optimizer class (AdamW)."""
    from pytorch_optimizer import SAM
    from transformers import Trainer

    class TrainerSAM(SAM):
        def step(self, closure=None):  # the Trainer calls step() after clipping: restore w, then AdamW
            self.second_step(zero_grad=False)

    class PeerSAMTrainer(Trainer):
        peer = "pto"

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
                params = [p for p in self.model.parameters() if p.requires_grad]
                wrapper = TrainerSAM if self.peer == "pto" else loop_sam_class()
                self.optimizer = wrapper(params, cls, rho=RHO, **kwargs)
            return self.optimizer

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)  # gradient at w
            sam = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
            sam.first_step(zero_grad=True)  # w + e
            super().training_step(model, inputs, num_items_in_batch)  # gradient at w + e
            return loss

    return PeerSAMTrainer


# ---- one run, in a child process -----------------------------------------------------------------
class StepProbe:
    """A TrainerCallback: the wall time of every optimizer step, and the memory of the last one."""

    def __init__(self, cuda, steps, memory):
        from transformers import TrainerCallback

        probe = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                probe._begin(state.global_step)

            def on_step_end(self, args, state, control, **kw):
                probe._end(state.global_step)

        self.cuda, self.steps, self.memory = cuda, steps, memory
        self.times, self.peak, self.callback = [], None, _CB()
        self._mode = self._base = None

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def _begin(self, step):
        self._sync()
        if self.memory and step == self.steps - 1:  # the last step measures memory, untimed
            if self.cuda:
                import torch

                self._base = 0
                torch.cuda.reset_peak_memory_stats()
            else:
                from hf_sam_scripts.memtrack import LiveBytes, reachable_tensor_bytes

                self._base = reachable_tensor_bytes("cpu")
                self._mode = LiveBytes()
                self._mode.__enter__()
        self.t0 = time.perf_counter()

    def _end(self, step):
        self._sync()
        dt = time.perf_counter() - self.t0
        if self._mode is not None:  # CPU: what the step started with + the window's peak of new tensors
            self._mode.__exit__(None, None, None)
            self.peak, self._mode, self._base = self._base + self._mode.peak, None, None
        elif self._base is not None:  # GPU: the allocator's peak (it includes what the step started with)
            import torch

            self.peak, self._base = torch.cuda.max_memory_allocated(), None
        else:
            self.times.append(dt)


def run_one(job):
    """Train one configuration; returns its step times and memory. Runs in a child process."""
    import torch
    from transformers import Trainer, TrainingArguments

    from hf_sam import SAMConfig, SAMTrainer

    torch.set_num_threads(job["threads"])
    if job["variant"] in PEERS and job["ga"] > 1:
        raise ValueError("not a SAM under gradient accumulation: first_step(zero_grad=True) on every micro-batch "
                         "drops the window's earlier gradients")
    variant, settings = variant_of(job["variant"])
    torch.manual_seed(0)
    model, data, batch = build(job["model"], PRESETS[job["preset"]][job["model"]], job["ga"])
    if job["lora"]:
        model = add_lora(model, job["model"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    cuda = job["device"] == "cuda"
    memory = not job["compile"]  # a dispatch mode inside compiled graphs would measure the mode
    probe = StepProbe(cuda, job["steps"], memory)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=job["steps"],
                             gradient_accumulation_steps=job["ga"], learning_rate=1e-4, report_to=[],
                             save_strategy="no", logging_steps=10_000, disable_tqdm=True, use_cpu=not cuda,
                             bf16=job["bf16"], dataloader_drop_last=True, seed=0,
                             optim="sgd" if variant == "bsam" else "adamw_torch",  # bSAM's update is its own
                             torch_compile=job["compile"], ddp_backend="gloo" if job.get("ddp") else None,
                             remove_unused_columns=variant != "saf")
    if variant != "saf" and job["model"] in ("vit", "mlp"):  # SAF reads each sample's position, MESA does not
        data = [{k: v for k, v in d.items() if k != "sample_index"} for d in data]
    kwargs = dict(model=model, args=args, train_dataset=data, callbacks=[probe.callback])
    if job["variant"] == "stock":
        trainer = Trainer(**kwargs)
    elif job["variant"] in PEERS:
        cls = peer_trainer_class()
        cls.peer = job["variant"]
        trainer = cls(**kwargs)
    else:
        lora = job["lora"] and variant != "flat_lora"  # Flat-LoRA perturbs the LoRA layers by construction
        config = SAMConfig(variant=variant, **settings, **({"perturb": "lora"} if lora else {}))
        trainer = SAMTrainer(**kwargs, sam_config=config)
    trainer.train()
    times = probe.times[job["warmup"]:] or probe.times
    passes = getattr(trainer, "_sam_last_passes", None)
    return {"step_s": statistics.fmean(times), "step_median_s": statistics.median(times), "peak_bytes": probe.peak,
            "param_bytes": sum(p.numel() * p.element_size() for p in trainable), "passes_last": passes}


def _child(job, queue):
    os.environ["OMP_NUM_THREADS"] = str(job["threads"])  # before torch is imported in this child
    try:
        queue.put(run_one(job))
    except Exception as err:  # report, don't crash the table
        queue.put({"error": f"{type(err).__name__}: {err}"})


def run_isolated(job):
    if job.get("ddp"):
        return run_ddp(job)
    if job.get("in_process"):
        import torch

        threads = torch.get_num_threads()
        try:
            return run_one(job)
        except Exception as err:
            return {"error": f"{type(err).__name__}: {err}"}
        finally:
            torch.set_num_threads(threads)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(job, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(job):
    """The same run in 2 processes (torchrun, gloo on CPU); rank 0's numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(job["ddp"]),
               "--master_port", str(_free_port()), os.path.abspath(__file__), "--ddp-worker", json.dumps(job),
               "--ddp-result", result]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
        env["OMP_NUM_THREADS"] = str(job["threads"])
        if job["device"] == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if not os.path.exists(result):
            return {"error": f"torchrun rc={proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
        with open(result) as f:
            return json.load(f)


def ddp_worker(job_json, result_path):
    job = json.loads(job_json)
    try:
        out = run_one(job)
    except Exception as err:
        out = {"error": f"{type(err).__name__}: {err}"}
    if int(os.environ.get("RANK", "0")) == 0:
        with open(result_path, "w") as f:
            json.dump(out, f)


# ---- tables --------------------------------------------------------------------------------------
def documented_memory(config) -> str:
    """The documented extra memory of a configuration: the variant's registry facts (the README's
    variants table is generated from them); a peer keeps one snapshot of w."""
    from hf_sam.variants import get_variant

    if config in PEERS:
        return "1 (snapshot)"
    if config == "stock":
        return ""
    facts = get_variant(variant_of(config)[0]).facts
    return facts.memory if facts else ""


def passes_of(config):
    from hf_sam import SAMConfig
    from hf_sam.variants import get_variant

    if config == "stock":
        return 1
    if config in PEERS:
        return 2
    variant, settings = variant_of(config)
    if variant == "looksam":  # 2 on every k-th step, 1 otherwise
        return 1 + 1 / SAMConfig(variant=variant, **settings).looksam_k
    return get_variant(variant).passes


def run_table(title, configs, base_job, repeats, log=print):
    """Interleaved rounds of `configs` (the first is the baseline); one row per configuration."""
    results = {c: [] for c in configs}
    if base_job.get("in_process"):  # the process's first-run costs (lazy inits, caches) must not land on a row
        run_isolated({**base_job, "variant": configs[0]})
    for r in range(repeats):
        for c in configs:
            results[c].append(run_isolated({**base_job, "variant": c}))
            got = results[c][-1]
            log(f"  round {r + 1}/{repeats} {PEERS.get(c, c)}: "
                + (f"{1000 * got['step_s']:.1f} ms/step" if "error" not in got else "error"), flush=True)
    base = results[configs[0]]
    rows = []
    for c in configs:
        row = dict(table=title, config=PEERS.get(c, c), variant=c, passes=passes_of(c))
        pairs = [(r, b) for r, b in zip(results[c], base) if "error" not in r and "error" not in b]
        if not pairs:
            err = next((r["error"] for r in results[c] + base if "error" in r), "no run")
            rows.append({**row, "error": err})
            continue
        ratios = [r["step_s"] / b["step_s"] for r, b in pairs]
        row.update(step_ms=1000 * statistics.median(r["step_s"] for r, _ in pairs),
                   ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                   rounds=len(pairs), round_ratios=ratios, round_ms=[1000 * r["step_s"] for r, _ in pairs],
                   param_bytes=pairs[0][0]["param_bytes"])
        peaks = [r["peak_bytes"] for r, _ in pairs if r["peak_bytes"] is not None]
        base_peaks = [b["peak_bytes"] for _, b in pairs if b["peak_bytes"] is not None]
        if peaks and base_peaks:
            row["peak_mib"] = statistics.median(peaks) / 2**20
            row["extra_copies"] = (statistics.median(peaks) - statistics.median(base_peaks)) / row["param_bytes"]
        row["readme"] = documented_memory(c)
        rows.append(row)
    print_table(title, rows, log)
    return rows


def print_table(title, rows, log=print):
    log(f"\n{title}")
    log(f"{'config':22} {'passes':>6} {'step ms':>9} {'x stock':>7} {'(min-max)':>11} {'peak MiB':>9} "
        f"{'extra copies':>12}  README extra memory")
    for r in rows:
        if "error" in r:
            log(f"{r['config']:22} n/a: {r['error'][:100]}")
            continue
        mem = f"{r['peak_mib']:9.1f} {r['extra_copies']:12.2f}" if "extra_copies" in r else f"{'n/a':>9} {'n/a':>12}"
        passes = f"{r['passes']:.3g}"
        log(f"{r['config']:22} {passes:>6} {r['step_ms']:9.1f} {r['ratio']:7.2f} "
            f"{'(%.2f-%.2f)' % (r['ratio_min'], r['ratio_max']):>11} {mem}  {r['readme'][:60]}")


def suite_tables(a):
    """Every table of issue 11, as (title, configs, job overrides, steps, warmup)."""
    return [
        ("tiny ViT: stock vs SAMTrainer vs peers", ["stock", "sam", "asam", "pto", "loop"], dict(model="vit"), a.steps),
        ("tiny GPT-2: stock vs SAMTrainer vs peers", ["stock", "sam", "asam", "pto", "loop"], dict(model="gpt2"),
         a.steps),
        ("anchor GPT-2 4x256, seq 128, batch 8", ["stock", "sam", "pto", "loop"], dict(model="anchor"),
         min(a.steps, 8)),
        ("tiny GPT-2, gradient accumulation 4", ["stock", "sam"], dict(model="gpt2", ga=4),
         min(a.steps, 8)),
        ("tiny GPT-2, torch_compile=True", ["stock", "sam"], dict(model="gpt2", compile=True), a.steps),
        ("tiny GPT-2 + LoRA (r 8, c_attn), perturb=lora", ["stock", "sam"], dict(model="gpt2", lora=True), a.steps),
        ("tiny GPT-2, DDP 2 processes (torchrun, gloo, CPU)", ["stock", "sam"], dict(model="gpt2", ddp=2), a.steps),
    ]


def cheap_tables(a):
    """The cheap-SAM tables (issue 16): one-pass variants, LookSAM and two-pass SAM vs the peers."""
    one_pass = ["stock", "msam", "saf", "mesa", "looksam_reuse", "looksam", "sam", "pto", "loop"]
    return [
        ("tiny ViT: one-pass variants, LookSAM k=5, SAM vs peers", one_pass, dict(model="vit"), a.steps),
        ("digits MLP 64-256-256-10: one-pass variants, LookSAM k=5, SAM vs peers", one_pass, dict(model="mlp"),
         a.steps),
        ("anchor GPT-2 4x256, seq 128, batch 8", ["stock", "sam", "pto", "loop"], dict(model="anchor"),
         min(a.steps, 8)),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: tiny on cpu, large on cuda")
    p.add_argument("--models", default="vit,gpt2", help="comma list of vit, gpt2, anchor, mlp")
    p.add_argument("--variants", default="sam,asam", help="comma list of variants or named configurations ("
                   + ", ".join(CONFIGS) + "), or 'all' for every registered variant")
    p.add_argument("--peers", action="store_true", help="add pytorch_optimizer.SAM and a loop-style SAM")
    p.add_argument("--ga", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--compile", action="store_true", help="torch_compile=True (memory is not measured)")
    p.add_argument("--lora", action="store_true", help="PEFT LoRA adapters, SAM with perturb=lora")
    p.add_argument("--ddp", type=int, default=0, help="run each configuration in this many processes (torchrun)")
    p.add_argument("--suite", action="store_true", help="every table of issue 11 (peers, anchor, GA, compile, "
                                                       "LoRA, DDP, all variants)")
    p.add_argument("--cheap", action="store_true", help="the cheap-SAM tables: tiny ViT and digits MLP (stock, "
                   "msam, saf, mesa, looksam between refreshes, looksam k=5, sam and the peers), anchor GPT-2")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of every child process (default: "
                   "the free cores, divided among the processes of a run; 1 each when several run)")
    p.add_argument("--steps", type=int, default=13, help="optimizer steps per run (default 13: the warm-up 2, 10 timed "
                   "- two of them LookSAM k=5 refreshes - and the memory step)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (the ratio is their median)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--in-process", action="store_true",
                   help="run every configuration in this process (quick checks; times less comparable)")
    p.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ddp-result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.ddp_worker is not None:
        return ddp_worker(a.ddp_worker, a.ddp_result)
    preset = a.preset or ("large" if a.device == "cuda" else "tiny")
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be an integer >= 1, got {a.threads}")
    threads = a.threads or default_threads(max(1, a.ddp))

    from hf_sam.variants import available

    base = dict(preset=preset, device=a.device, steps=a.steps, warmup=a.warmup, bf16=a.bf16, ga=a.ga,
                compile=a.compile, lora=a.lora, ddp=a.ddp, threads=threads,
                in_process=a.in_process)
    variants = available() if a.variants == "all" else a.variants.split(",")
    extra = ["pto", "loop"] if a.peers else []
    print(f"hf_sam bench: preset={preset} device={a.device} bf16={a.bf16} steps={a.steps} (mean after "
          f"{a.warmup} warm-up steps; the last step measures memory), {a.repeats} interleaved round(s), "
          f"threads per process={threads}{' (--threads)' if a.threads else ''} (cores usable "
          f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.1f})")
    rows = []
    if a.suite or a.cheap:
        for title, configs, over, steps in (suite_tables(a) if a.suite else cheap_tables(a)):
            rows += run_table(title, configs, {**base, **over, "steps": steps}, a.repeats)
        if a.suite:
            rows += run_table("tiny ViT: every variant (1 round)", ["stock", *available()], {**base, "model": "vit"},
                              1)
    else:
        for model in a.models.split(","):
            title = f"{model} ({preset})" + (f", GA {a.ga}" if a.ga > 1 else "") + (", compiled" if a.compile else "") \
                + (", LoRA" if a.lora else "") + (f", DDP {a.ddp} processes" if a.ddp else "")
            rows += run_table(title, ["stock", *variants, *extra], {**base, "model": model}, a.repeats)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"preset": preset, "device": a.device, "bf16": a.bf16, "threads": threads, "rows": rows}, f,
                      indent=1)
    return rows


if __name__ == "__main__":
    main()
