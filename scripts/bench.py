"""Benchmark: SAMTrainer (each variant) vs the stock Trainer, side by side in one run.

For every model preset it trains the stock Trainer and SAMTrainer with each requested variant for
the same number of steps on the same synthetic batches and prints the median optimizer-step time
and the peak memory, with their ratios to the stock Trainer. Each configuration runs in its own
fresh child process (so peak memory is per configuration); the runs alternate and repeat.

    python scripts/bench.py                                   # tiny ViT and GPT-2 on CPU
    python scripts/bench.py --variants all --steps 20
    python scripts/bench.py --device cuda --preset large --bf16 --out bench.json   # ViT-B/16, GPT-2 124M

Peak memory: torch.cuda.max_memory_allocated on a GPU, the child's peak RSS on a CPU.
A benchmark, not a test: numbers depend on the machine.
"""

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time

PRESETS = {
    "tiny": {
        "vit": dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, num_labels=10, batch=32),
        "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=512, seq=128, batch=8),
    },
    "large": {  # ViT-B/16 at 224 px and GPT-2 124M at sequence length 1024
        "vit": dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, num_labels=1000, batch=64),
        "gpt2": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257, seq=1024, batch=8),
    },
}


def build(model_name, spec):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

    spec = dict(spec)
    batch = spec.pop("batch")
    g = torch.Generator().manual_seed(0)
    if model_name == "vit":
        model = ViTForImageClassification(ViTConfig(**spec))
        n = batch * 4
        data = [{"pixel_values": torch.randn(3, spec["image_size"], spec["image_size"], generator=g),
                 "labels": torch.randint(0, spec["num_labels"], (), generator=g)} for _ in range(n)]
    else:
        seq = spec.pop("seq")
        model = GPT2LMHeadModel(GPT2Config(**spec))
        n = batch * 4
        data = []
        for _ in range(n):
            ids = torch.randint(0, spec["vocab_size"], (seq,), generator=g)
            data.append({"input_ids": ids, "labels": ids.clone()})
    return model, data, batch


class StepTimer:
    """A TrainerCallback recording the wall time of every optimizer step."""

    def __init__(self, cuda):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer._sync()
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer._sync()
                timer.times.append(time.perf_counter() - timer.t0)

        self.cuda, self.times, self.callback = cuda, [], _CB()

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def run_one(job):
    """Train one configuration; returns median step time (s) and peak memory (MiB). Runs in a child."""
    import torch
    from transformers import Trainer, TrainingArguments

    from hf_sam import SAMConfig, SAMTrainer

    torch.manual_seed(0)
    model, data, batch = build(job["model"], PRESETS[job["preset"]][job["model"]])
    cuda = job["device"] == "cuda"
    timer = StepTimer(cuda)
    out = tempfile.mkdtemp()
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=job["steps"],
                             learning_rate=1e-4, report_to=[], save_strategy="no", logging_steps=10_000,
                             disable_tqdm=True, use_cpu=not cuda, bf16=job["bf16"], dataloader_drop_last=True,
                             optim="adamw_torch", seed=0)
    kwargs = dict(model=model, args=args, train_dataset=data, callbacks=[timer.callback])
    if job["variant"] == "stock":
        trainer = Trainer(**kwargs)
    else:
        trainer = SAMTrainer(**kwargs, sam_config=SAMConfig(variant=job["variant"]))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    times = timer.times[job["warmup"]:] or timer.times
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"median_step_s": statistics.median(times), "peak_mib": peak}


def _child(job, queue):
    try:
        queue.put(run_one(job))
    except Exception as err:  # report, don't crash the table
        queue.put({"error": f"{type(err).__name__}: {err}"})


def run_isolated(job):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(job, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: tiny on cpu, large on cuda")
    p.add_argument("--models", default="vit,gpt2")
    p.add_argument("--variants", default="sam,asam", help="comma list, or 'all' for every registered variant")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="alternate stock/SAM runs this many times")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    preset = a.preset or ("large" if a.device == "cuda" else "tiny")

    from hf_sam.variants import available, get_variant

    variants = available() if a.variants == "all" else a.variants.split(",")
    rows = []
    for model in a.models.split(","):
        results = {}
        for _ in range(a.repeats):
            for variant in ["stock", *variants]:
                job = dict(model=model, preset=preset, device=a.device, variant=variant, steps=a.steps,
                           warmup=a.warmup, bf16=a.bf16)
                r = run_isolated(job)
                results.setdefault(variant, []).append(r)
        base = results["stock"]
        base_t = statistics.median(r["median_step_s"] for r in base if "error" not in r)
        base_m = statistics.median(r["peak_mib"] for r in base if "error" not in r)
        for variant, rs in results.items():
            ok = [r for r in rs if "error" not in r]
            if not ok:
                rows.append(dict(model=model, variant=variant, error=rs[0]["error"]))
                continue
            t = statistics.median(r["median_step_s"] for r in ok)
            m = statistics.median(r["peak_mib"] for r in ok)
            passes = 1 if variant == "stock" else get_variant(variant).passes
            rows.append(dict(model=model, variant=variant, passes=passes, step_ms=1000 * t, time_ratio=t / base_t,
                             peak_mib=m, mem_ratio=m / base_m))
    mem = "peak GPU MiB" if a.device == "cuda" else "peak RSS MiB"
    print(f"\nhf_sam bench: preset={preset} device={a.device} bf16={a.bf16} steps={a.steps} (median after "
          f"{a.warmup} warm-up steps)")
    print(f"{'model':6} {'variant':10} {'passes':>6} {'step ms':>9} {'x stock':>8} {mem:>13} {'x stock':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:6} {r['variant']:10} n/a: {r['error'][:80]}")
        else:
            print(f"{r['model']:6} {r['variant']:10} {r['passes']:>6} {r['step_ms']:9.1f} {r['time_ratio']:8.2f} "
                  f"{r['peak_mib']:13.0f} {r['mem_ratio']:8.2f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"preset": preset, "device": a.device, "bf16": a.bf16, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
