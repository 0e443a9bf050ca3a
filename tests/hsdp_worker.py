"""Run by test_hsdp.py under `torchrun --nproc_per_node 4` (CPU, gloo): SAMTrainer on HSDP, FSDP2 on a
2x2 mesh (replicate x shard: processes {0,1} and {2,3} each shard the model, the two copies replicate).

    python hsdp_worker.py OUT_DIR CHECK [CHECK ...]

The tiny GPT-2, data and single-process references are fsdp_worker's (the references run the
variants' equations over the 4 ranks' micro-batches: global = their union, local = each rank's own).

Test-only harness: besides fsdp_worker's FSDP2 forcing, accelerate's ParallelismConfig
(dp_replicate_size=2, dp_shard_size=2) and its device mesh go on the accelerator state, so that
accelerate's fully_shard gets the 2-D mesh (what `accelerate launch` with parallelism_config does on GPUs).
"""

import os
import sys

import torch
from torch.distributed.tensor import DTensor

import fsdp_worker as fw  # noqa: E402
from hf_sam_scripts.collectives import install_counters  # noqa: E402


class ForcedHSDP(fw.ForcedFSDP2):
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        from accelerate.parallelism_config import ParallelismConfig

        state = self.accelerator.state
        if state.parallelism_config is None:
            pc = ParallelismConfig(dp_replicate_size=2, dp_shard_size=2)
            state.parallelism_config = pc
            state.device_mesh = pc.build_device_mesh("cpu")


def check(name, out):
    res = {}
    if name == "restored":  # learning rate 0: after the SAM steps the weights must be w, bit for bit
        for sync in (True, False):
            init, tr, _ = fw.train(os.path.join(out, f"restored{int(sync)}"), 2, 1, learning_rate=0.0,
                                   sam_sync_ascent=sync, cls=ForcedHSDP)
            res[f"sync{int(sync)}_bitwise_equal"] = all(torch.equal(fw.full(p), q.detach()) for p, q in
                                                        zip(tr.model.parameters(), init.parameters()))
        return res
    if name == "node_on_1d_refused":  # sync_ascent='node' on a 1-D mesh: a clear error, weights untouched
        try:
            fw.train(os.path.join(out, name), 1, 1, sam_sync_ascent="node")
            return {"refused": None}
        except ValueError as err:
            return {"refused": str(err)}
    if name == "resume":
        cfg = {"sam_rho": 0.5, **fw.VARIANT_CFG["fsam"]}
        _, full_run, _ = fw.train(os.path.join(out, "full"), 4, 1, cls=ForcedHSDP, **cfg)
        _, first, _ = fw.train(os.path.join(out, "part"), 2, 1, save_steps=2, cls=ForcedHSDP, **cfg)
        _, resumed, _ = fw.train(os.path.join(out, "part"), 4, 1, resume=os.path.join(out, "part", "checkpoint-2"),
                                 cls=ForcedHSDP, **cfg)
        res["resume_vs_uninterrupted"] = max((fw.full(p) - fw.full(q)).abs().max().item() for p, q in
                                             zip(resumed.model.parameters(), full_run.model.parameters()))
        res["first_run_moved"] = max((fw.full(p) - fw.full(q)).abs().max().item() for p, q in
                                     zip(first.model.parameters(), full_run.model.parameters()))
        return res
    variant, mode, ga = name.split("_")  # e.g. sam_global_2
    ga = int(ga)
    cfg = {"sam_rho": 0.5, **fw.VARIANT_CFG[variant]}
    sam = dict(cfg, sam_sync_ascent={"global": True, "local": False, "node": "node"}[mode])
    init, tr, seen = fw.train(os.path.join(out, name), 3, ga, cls=ForcedHSDP, **sam)
    p = tr.model.transformer.wte.weight
    res["placements"] = str(p.placements)
    res["mesh_shape"] = list(p.device_mesh.shape)
    res["sharded"] = all(isinstance(q, DTensor) for q in tr.model.parameters())
    res["ranks"] = len(seen)
    group = tr.model.transformer.wte.weight.device_mesh.get_group(1)
    res["shard_group"] = torch.distributed.get_process_group_ranks(group)
    for ref_mode in ("global", "local", "node"):
        res[f"dev_vs_{ref_mode}"] = fw.deviation(tr, fw.reference(init, seen, ga, ref_mode, variant, cfg))
    weights = {n: fw.full(q) for n, q in tr.model.named_parameters()}  # every rank gathers (collectives)
    if torch.distributed.get_rank() == 0:  # the two-"node" launch is compared with these, bit for bit
        torch.save(weights, os.path.join(out, f"weights_{name}.pt"))
    res["distinct_micro_batches"] = len({str(mb) for r in seen for mb in r})
    return res


if __name__ == "__main__":
    install_counters()
    fw.run_checks(check, "hsdp")
