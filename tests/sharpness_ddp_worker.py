"""Run by test_sharpness.py under `torchrun --nproc_per_node 2` (CPU, gloo): each rank measures half of
the batches of the test's union, through a DDP-wrapped model, and writes rank<r>.json."""

import json
import os
import sys
import time

import torch
import torch.distributed as dist

import tiny  # noqa: E402
from test_sharpness import make_batches, make_model  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_sam.sharpness import SharpnessCallback, hessian_eigenvalues, hessian_trace, m_sharpness  # noqa: E402


def callback_run(out_dir):
    """A stock Trainer under DDP with the callback measuring on the trainer's (sharded) eval set."""
    args = TrainingArguments(output_dir=os.path.join(out_dir, "trainer"), per_device_train_batch_size=8, max_steps=2,
                             use_cpu=True, report_to=[], eval_strategy="steps", eval_steps=2,
                             per_device_eval_batch_size=8, save_strategy="no", disable_tqdm=True, learning_rate=0.1)
    torch.manual_seed(0)
    model = tiny.MLP(d_in=3)
    trainer = Trainer(model=model, args=args, train_dataset=tiny.Blobs(n=64, d_in=3),
                      eval_dataset=tiny.Blobs(n=32, d_in=3, seed=9))
    callback = SharpnessCallback.attach(trainer, max_batches=2, measures=("top_eigenvalue", "m_sharpness"),
                                        iters=100, tol=1e-6)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "sharpness/m_sharpness" in e]
    return {"logged": logged, "weights": {n: p.detach().tolist() for n, p in model.named_parameters()},
            "held_out_labels": [b["labels"].tolist() for b in callback.held_out_batches()]}


def budget_run(ddp, share, rank):
    """max_seconds under DDP with clocks that disagree (rank 1's runs 3x faster): the ranks still stop at the
    same product (a rank leaving the loop alone would leave the other waiting in its all-reduce)."""
    from hf_sam import sharpness

    calls = [0]

    def clock():
        calls[0] += 1
        return calls[0] * (1.0 if rank == 0 else 3.0)

    sharpness._clock = clock
    try:
        trace, stderr, info = hessian_trace(ddp, share, samples=40, seed=5, max_seconds=30, return_stderr=True,
                                            return_info=True)
    finally:
        sharpness._clock = time.perf_counter
    return {"trace": [trace, stderr], "samples": info["samples"], "stopped": info["stopped"]}


def main(out_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    share = make_batches(n_batches=4)[rank::2]  # rank 0: batches 0, 2; rank 1: batches 1, 3
    result = {
        "m_sharpness": m_sharpness(ddp, share, 0.1, m=4),
        "eigenvalues": hessian_eigenvalues(ddp, share, k=2, iters=100, tol=1e-8, method="lanczos"),
        "trace": list(hessian_trace(ddp, share, samples=20, seed=5, return_stderr=True)),
        "weights_unchanged": all(torch.equal(p, b) for p, b in zip(model.parameters(), before)),
    }
    result["budget"] = budget_run(ddp, share, rank)
    result["callback"] = callback_run(out_dir)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    # Leave without the interpreter's teardown, like tests/ddp_worker.py: torch's gloo backend on CPU
    # now and then hangs or aborts at exit after all the work is done and written.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
