"""Run by test_optim.py under torchrun (2 CPU processes, gloo): hf_sam.SAM in a DDP loop."""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import tiny  # noqa: E402
from ddp_worker import reference  # noqa: E402
from hf_sam import SAM, SAMConfig  # noqa: E402


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = tiny.MLP()
    init = copy.deepcopy(model)
    ddp = DistributedDataParallel(model)
    count = {"n": 0}

    def hook(state, bucket):
        count["n"] += 1
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    opt = SAM(model.named_parameters(), torch.optim.SGD, config=SAMConfig(rho=0.3), model=ddp, lr=0.1)
    data = tiny.Blobs(n=64)
    ga, steps, bs = 2, 3, 4
    seen = []
    for s in range(steps):
        for k in range(ga):
            start = ((s * ga + k) * world + rank) * bs
            items = [data[i] for i in range(start, start + bs)]
            mb = {key: torch.stack([it[key] for it in items]) for key in items[0]}
            seen.append({key: v.tolist() for key, v in mb.items()})

            def closure(mb=mb):
                loss = ddp(**mb)["loss"] / ga
                loss.backward()
                return loss

            if k < ga - 1:
                with ddp.no_sync():
                    opt.accumulate(closure)
            else:
                opt.step(closure)
        opt.zero_grad()
    gathered = [None] * world
    dist.all_gather_object(gathered, seen)
    ref = reference(init, gathered, rho=0.3, lr=0.1, ga=ga)
    result = {"weights": [p.detach().flatten().tolist() for p in model.parameters()],
              "max_dev_from_reference": max((p - q).abs().max().item()
                                            for p, q in zip(model.parameters(), ref.parameters())),
              "allreduces": count["n"]}
    with open(os.path.join(out, f"optim_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    os._exit(0)  # see ddp_worker.py: gloo on CPU sometimes aborts in interpreter teardown


if __name__ == "__main__":
    main()
