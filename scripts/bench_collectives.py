"""Collectives per optimizer step: stock vs SAM (per-device and global ascent), DDP and FSDP2.

Run with two processes (CPU over gloo, or GPUs over NCCL):

    torchrun --nproc_per_node 2 scripts/bench_collectives.py            # CPU (gloo)
    torchrun --nproc_per_node 2 scripts/bench_collectives.py --device cuda

Trains a tiny GPT-2 (2 blocks, each block and the root one FSDP group) for a few steps per setting
and counts, per optimizer step and per process: gradient all-reduces (DDP buckets), all-gathers and
reduce-scatters (FSDP2), and other `torch.distributed.all_reduce` calls (hf_sam's scalar norms under
FSDP, the SAM metrics' reduction at log time, DDP's own bookkeeping). Prints a Markdown table on
rank 0 (and JSON with --out).

On a CPU accelerate does not set up FSDP for the Trainer (it trains DDP instead), so for the FSDP
rows this script puts the FSDP2 plugin on the accelerator state itself (as tests/fsdp_worker.py
does); on GPUs accelerate sets it up and nothing is forced.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from hf_sam import SAMTrainer, SAMTrainingArguments
from hf_sam_scripts.collectives import COUNTS, force_fsdp2, install_counters

VOCAB, SEQ = 101, 16


class Ids(Dataset):
    def __init__(self, n):
        self.rows = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class CountingTrainer(SAMTrainer):
    force_fsdp = False

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.force_fsdp:  # CPU: see the module docstring
            force_fsdp2(self)

    def training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
        if not getattr(self, "_hooked", False) and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            def hook(state, bucket):
                COUNTS["ddp_bucket_all_reduce"] += 1
                return default_hooks.allreduce_hook(state, bucket)

            model.register_comm_hook(None, hook)
            self._hooked = True
        return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)


def model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=SEQ))


def run(setting, ga, steps, device, out_dir):
    backend, mode = setting.split(":")
    sam = {"stock": {"sam_rho": 0.0}, "per-device": {"sam_sync_ascent": False},
           "global": {"sam_sync_ascent": True}}[mode]
    kw = dict(output_dir=os.path.join(out_dir, f"{backend}_{mode}_{ga}"), per_device_train_batch_size=4,
              gradient_accumulation_steps=ga, max_steps=steps, learning_rate=0.1, optim="sgd", report_to=[],
              save_strategy="no", logging_steps=steps, disable_tqdm=True, use_cpu=device == "cpu",
              ddp_find_unused_parameters=False, **sam)
    if backend == "fsdp2":
        kw.update(fsdp=True, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"],
                                          "reshard_after_forward": True})
    CountingTrainer.force_fsdp = backend == "fsdp2"
    tr = CountingTrainer(model=model(), args=SAMTrainingArguments(**kw), train_dataset=Ids(64 * ga * steps))
    before = dict(COUNTS)
    tr.train()
    per_step = {k: (COUNTS[k] - before[k]) / steps for k in COUNTS}
    return {"backend": backend, "mode": mode, "ga": ga, **per_step}


def main():
    install_counters()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ga", default="1,2", help="comma list of gradient_accumulation_steps values")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--tmp", default="/tmp/hf_sam_bench_collectives")
    a = p.parse_args()
    rows = []
    # DDP first: the FSDP rows change accelerate's process-wide state on a CPU
    for setting in ("ddp:stock", "ddp:per-device", "ddp:global", "fsdp2:stock", "fsdp2:per-device", "fsdp2:global"):
        for ga in (int(x) for x in a.ga.split(",")):
            rows.append(run(setting, ga, a.steps, a.device, a.tmp))
    if dist.get_rank() == 0:
        print("| backend | ascent | GA | all-gathers | reduce-scatters | other all-reduces | DDP bucket all-reduces |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['backend']} | {r['mode']} | {r['ga']} | {r['all_gather']:g} | {r['reduce_scatter']:g} | "
                  f"{r['all_reduce']:g} | {r['ddp_bucket_all_reduce']:g} |")
        if a.out:
            with open(a.out, "w") as f:
                json.dump(rows, f, indent=1)
    dist.barrier()
    os._exit(0)  # gloo sometimes aborts in the interpreter's teardown


if __name__ == "__main__":
    main()
