"""Profile the step engine's own work: where each microsecond of a SAMTrainer step goes.

Two models, one thread, CPU:
- the digits MLP of the studies (sklearn digits, 64 -> 128 -> 10, ReLU, batch 32; 8 batches per epoch);
- a tiny ViT with the shape of configs/vit_digits.yaml (32 px, patch 8, hidden 64, 2 layers, 4 heads,
  intermediate 128, 10 classes, batch 32) on random images (a stand-in: the step does not care).

For each model the stock `Trainer` and `SAMTrainer` with each variant (sam, msam, mesa, looksam by
default) train N steps with AdamW:

1. Wall time, interleaved rounds: every configuration runs once per round, in the same order, and
   the rounds repeat; the time of a run is the sum of its optimizer steps (on_step_begin to
   on_step_end, the first `--warmup` steps left out). "x stock" is the median over rounds of the
   per-round ratio to the stock run, so a slow phase of a shared machine hits both sides.
2. A cProfile of one more run per variant: the engine's functions (hf_sam.step, hf_sam.ops, the
   Trainer front-end) with their own time and cumulative time per step in microseconds, the torch
   built-ins they call (time attributed to the calling engine function), and the split of the
   SAMTrainer step into the host's passes (`_sam_run_pass`, i.e. the stock training_step) and the
   machinery around them. cProfile adds a constant cost per Python call, so the machinery figures
   are upper bounds; the ratios of step 1 are measured without it.

    python scripts/profile_step.py                              # both models, 200 steps, 3 rounds
    python scripts/profile_step.py --models mlp --variants msam --steps 200 --top 30
    python scripts/profile_step.py --no-profile --rounds 5      # wall ratios only

A measurement, not a test: numbers depend on the machine.
"""

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

VIT = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=128, num_labels=10)
BATCH = 32
BATCHES_PER_EPOCH = 8


# ---- models and data ---------------------------------------------------------------------------
def mlp_model():
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(64, 128)
            self.head = nn.Linear(128, 10)

        def forward(self, x, labels=None):
            logits = self.head(torch.relu(self.fc1(x)))
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = nn.functional.cross_entropy(logits, labels)
            return out

    return MLP()


def mlp_data():
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    n = BATCH * BATCHES_PER_EPOCH
    x = torch.tensor(d.data[:n] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[:n], dtype=torch.long)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def vit_model():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(**VIT))


def vit_data():
    import torch

    g = torch.Generator().manual_seed(0)
    n = BATCH * BATCHES_PER_EPOCH
    return [{"pixel_values": torch.randn(3, VIT["image_size"], VIT["image_size"], generator=g),
             "labels": torch.randint(0, VIT["num_labels"], (), generator=g)} for i in range(n)]


MODELS = {"mlp": (mlp_model, mlp_data), "vit": (vit_model, vit_data)}


# ---- one run -----------------------------------------------------------------------------------
def make_trainer(model_name, variant, steps, data, warmup=0):
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_sam import SAMConfig, SAMTrainer

    class StepClock(TrainerCallback):
        """Wall and process CPU time from the start of step `warmup` to the end of the last step (two clock
        reads per run: process_time is slow on some machines)."""

        def __init__(self, warmup):
            self.warmup, self.start, self.wall, self.cpu = warmup, None, None, None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == self.warmup:
                self.start = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == args.max_steps and self.start is not None:
                self.wall = time.perf_counter() - self.start[0]
                self.cpu = time.process_time() - self.start[1]

    torch.manual_seed(0)
    model = MODELS[model_name][0]()
    clock = StepClock(warmup)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="profile_step_"), per_device_train_batch_size=BATCH,
                             max_steps=steps, learning_rate=1e-3, optim="adamw_torch", report_to=[],
                             save_strategy="no", logging_steps=10_000_000, disable_tqdm=True, use_cpu=True,
                             dataloader_drop_last=True, seed=0, remove_unused_columns=False)
    kwargs = dict(model=model, args=args, train_dataset=data, callbacks=[clock])
    if variant == "stock":
        return Trainer(**kwargs), clock
    extra = {"saf_start": 0} if variant == "mesa" else {}  # the KL term from the second epoch (step 9)
    return SAMTrainer(**kwargs, sam_config=SAMConfig(variant=variant, **extra)), clock


def timed_run(model_name, variant, steps, warmup, data):
    trainer, clock = make_trainer(model_name, variant, steps, data, warmup)
    trainer.train()
    return clock.wall, clock.cpu


# ---- the profile -------------------------------------------------------------------------------
ENGINE_FILES = (os.path.join("hf_sam", "step.py"), os.path.join("hf_sam", "ops.py"),
                os.path.join("hf_sam", "trainer.py"), os.path.join("hf_sam", "variants"))


def _engine(func) -> bool:
    return any(f in func[0] for f in ENGINE_FILES)


def _label(func) -> str:
    file, line, name = func
    if file == "~":
        return name
    return f"{os.path.relpath(file, ROOT) if file.startswith(ROOT) else os.path.basename(file)}:{line}({name})"


def profile_run(model_name, variant, steps, data, top, log):
    trainer, _ = make_trainer(model_name, variant, steps, data)
    prof = cProfile.Profile()
    prof.enable()
    trainer.train()
    prof.disable()
    st = pstats.Stats(prof).stats  # func -> (cc, nc, tottime, cumtime, callers)

    def find(name, file_part):
        hits = [v for f, v in st.items() if f[2] == name and file_part in f[0]]
        return hits[0] if hits else None

    us = 1e6 / steps
    log(f"\n### {model_name} / {variant}: cProfile, {steps} steps (us per step; cProfile inflates Python calls)")
    ours = os.path.join("hf_sam", "trainer.py")
    stock = find("training_step", os.path.join("transformers", "trainer.py"))
    host = find("training_step", ours) or stock
    passes = find("_sam_run_pass", ours)
    opt = max((v for f, v in st.items() if f[2] == "step" and os.path.join("torch", "optim") in f[0]),
              key=lambda v: v[3], default=None)
    if host is not None:
        log(f"training_step total {host[3] * us:9.1f}")
    if passes is not None:
        log(f"  the host's passes  {passes[3] * us:9.1f}  ({passes[1] / steps:.2f} per step)")
        log(f"  machinery          {(host[3] - passes[3]) * us:9.1f}")
    elif stock is not None:
        log(f"  (stock) host step  {stock[3] * us:9.1f}")
    if opt is not None:
        log(f"optimizer step       {opt[3] * us:9.1f}")
    rows = [(f, v) for f, v in st.items() if _engine(f)]
    rows.sort(key=lambda fv: -fv[1][3])
    log(f"{'engine function':70s} {'calls':>6s} {'own':>8s} {'cum':>9s}")
    for f, v in rows[:top]:
        log(f"{_label(f)[:70]:70s} {v[1] / steps:6.2f} {v[2] * us:8.1f} {v[3] * us:9.1f}")
    # torch built-ins called from the engine, their time attributed to the engine callers
    builtin = []
    for f, v in st.items():
        if f[0] != "~":
            continue
        tt = sum(e[2] for c, e in v[4].items() if _engine(c) and "trainer.py" not in c[0])
        n = sum(e[1] for c, e in v[4].items() if _engine(c) and "trainer.py" not in c[0])
        if n:
            builtin.append((tt, n, f[2]))
    builtin.sort(reverse=True)
    for kind, keep in (("torch", True), ("other built-in", False)):
        part = [b for b in builtin if ("torch" in b[2]) == keep]
        log(f"{kind} calls from step.py, ops.py and the variant per step: {sum(b[1] for b in part) / steps:6.1f}, "
            f"own time {sum(b[0] for b in part) * us:8.1f} us")
    log(f"{'built-in called by step.py/ops.py/variants':70s} {'calls':>6s} {'own':>8s}")
    for tt, n, name in builtin[:top]:
        log(f"{name[:70]:70s} {n / steps:6.2f} {tt * us:8.1f}")


# ---- main --------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,vit")
    p.add_argument("--variants", default="sam,msam,mesa,looksam")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--no-profile", dest="profile", action="store_false")
    a = p.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    variants = [v for v in a.variants.split(",") if v]
    for model_name in a.models.split(","):
        data = MODELS[model_name][1]()
        configs = ["stock"] + variants
        times = {c: [] for c in configs}
        for _ in range(a.rounds):
            for c in configs:
                times[c].append(timed_run(model_name, c, a.steps, a.warmup, data))
        n = a.steps - a.warmup
        print(f"\n## {model_name}: {a.steps} steps ({n} timed) x {a.rounds} interleaved rounds, one thread")
        print(f"{'config':10s} {'wall us/step':>12s} {'x stock':>8s} {'(min-max)':>13s}   "
              f"{'cpu us/step':>11s} {'x stock':>8s} {'(min-max)':>13s}")
        for c in configs:
            cells = []
            for k in (0, 1):
                ratios = [t[k] / s[k] for t, s in zip(times[c], times["stock"])]
                cells.append(f"{statistics.median(t[k] for t in times[c]) / n * 1e6:12.1f} "
                             f"{statistics.median(ratios):8.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
            print(f"{c:10s} " + "   ".join(cells))
        if a.profile:
            for c in configs:
                profile_run(model_name, c, a.steps, data, a.top, print)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
