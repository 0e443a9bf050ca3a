"""Counting collectives and forcing FSDP2 onto a CPU Trainer: for scripts/bench_collectives.py and the
multi-process tests (tests/fsdp_worker.py, tests/hsdp_worker.py)."""

import torch.distributed as dist

COUNTS = {"all_gather": 0, "reduce_scatter": 0, "all_reduce": 0, "ddp_bucket_all_reduce": 0}


def install_counters():
    """Count calls of the torch.distributed collectives FSDP2 and hf_sam use (they look them up at call time)."""
    def counted(name, key):
        fn = getattr(dist, name)

        def wrapper(*a, **k):
            COUNTS[key] += 1
            return fn(*a, **k)

        setattr(dist, name, wrapper)

    for name, key in (("all_gather_single", "all_gather"), ("all_gather_into_tensor", "all_gather"),
                      ("reduce_scatter_single", "reduce_scatter"), ("reduce_scatter_tensor", "reduce_scatter"),
                      ("all_reduce", "all_reduce")):
        counted(name, key)


def force_fsdp2(trainer):
    """CPU only (measurement and tests): put the FSDP2 plugin on a trainer's accelerator state.

    Call from `create_accelerator_and_postprocess` after the stock one. accelerate keeps a CPU run on
    MULTI_CPU; the distributed type must also change in PartialState's shared state, which
    AcceleratorState re-reads (else the run reverts mid-training and `no_sync` stops working).
    """
    if trainer.is_fsdp_enabled:
        return
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
