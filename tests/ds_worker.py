"""Run by test_deepspeed.py under `torchrun --nproc_per_node 2` with DS_ACCELERATOR=cpu (gloo).

    python ds_worker.py OUT_DIR CHECK [CHECK ...]      CHECK = <variant>_<global|local>_<GA>_z<stage>

SAMTrainer on DeepSpeed ZeRO-1/2 through the Trainer's own DeepSpeed path (no forcing: with
DS_ACCELERATOR=cpu accelerate sets DeepSpeed up on a CPU). The weights are compared with the
single-process references of fsdp_worker.py. Rank 0 writes OUT_DIR/ds_<CHECK>.json per check.
"""

import copy
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import tiny  # noqa: E402
from fsdp_worker import PER, VARIANT_CFG, Ids, deviation, model, reference, run_checks  # noqa: E402


class Recording(tiny.InOrderSAMTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
        self.seen.append(inputs["input_ids"].tolist())
        return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)


def train(out, stage, ga, steps=3, resume=None, **kw):
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": stage}}
    init = model()
    tr = Recording(model=copy.deepcopy(init), train_dataset=Ids(2 * PER * ga * 8),
                   args=tiny.args(out, gradient_accumulation_steps=ga, per_device_train_batch_size=PER,
                                  max_steps=steps, deepspeed=ds, **kw))
    tr.seen = []
    tr.train(resume_from_checkpoint=resume)
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, tr.seen)
    return init, tr, seen


def check(name, out):
    if name == "restored":  # learning rate 0, GA 2: the weights must be w, bit for bit, in both modes
        res = {}
        for sync in (True, False):
            init, tr, _ = train(os.path.join(out, f"restored{int(sync)}"), 2, 2, steps=2, learning_rate=0.0,
                                sam_sync_ascent=sync)
            res[f"sync{int(sync)}_bitwise_equal"] = all(torch.equal(p.detach(), q.detach()) for p, q in
                                                        zip(tr.model.parameters(), init.parameters()))
        return res
    if name == "resume":  # F-SAM's EMA lives in sam_state (per process)
        cfg = {"sam_rho": 0.5, **VARIANT_CFG["fsam"]}
        _, full_run, _ = train(os.path.join(out, "ds_full"), 2, 1, steps=4, **cfg)
        train(os.path.join(out, "ds_part"), 2, 1, steps=2, save_strategy="steps", save_steps=2, **cfg)
        _, resumed, _ = train(os.path.join(out, "ds_part"), 2, 1, steps=4,
                              resume=os.path.join(out, "ds_part", "checkpoint-2"), **cfg)
        return {"resume_vs_uninterrupted": max((p.detach() - q.detach()).abs().max().item() for p, q in
                                               zip(resumed.model.parameters(), full_run.model.parameters())),
                "ckpt_files": sorted(os.listdir(os.path.join(out, "ds_part", "checkpoint-2")))}
    variant, mode, ga, stage = name.split("_")
    ga, stage = int(ga), int(stage[1:])
    cfg = {"sam_rho": 0.5, **VARIANT_CFG[variant]}
    sam = dict(cfg)
    if mode == "global":
        sam["sam_sync_ascent"] = True  # per-device: left unset, the default under DeepSpeed
    init, tr, seen = train(os.path.join(out, name), stage, ga, **sam)
    res = {"engine": type(tr.model_wrapped).__name__, "zero_stage": tr.model_wrapped.zero_optimization_stage(),
           "sync_ascent": tr.sam_config.sync_ascent}
    for ref_mode in ("global", "local"):
        if variant in ("sam", "fsam") or ref_mode == mode:
            res[f"dev_vs_{ref_mode}"] = deviation(tr, reference(init, seen, ga, ref_mode, variant, cfg))
    res["distinct_micro_batches"] = len({json.dumps(mb) for r in seen for mb in r})
    return res


if __name__ == "__main__":
    run_checks(check, "ds")
