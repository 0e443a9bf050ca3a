"""SAMTrainer on DeepSpeed ZeRO-1/2: two gloo processes on the CPU (DS_ACCELERATOR=cpu), tests/ds_worker.py.

The Trainer's own DeepSpeed path (no forcing). One launch runs every trainer below (~30-40 s; the first
DeepSpeed run on a machine also builds DeepSpeed's shared-memory comm op once, a few minutes).
The references are the single-process ones of tests/fsdp_worker.py. Skipped without deepspeed.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKS = ["sam_local_1_z2", "sam_local_2_z1", "sam_global_2_z2", "gsam_local_1_z1", "looksam_global_1_z2",
          "fsam_global_1_z1", "restored", "resume"]


class Results(dict):
    def __getitem__(self, name):
        res = super().__getitem__(name)
        assert "error" not in res, f"{name}: {res.get('error')}\n{res.get('trace')}"
        return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29625",
           os.path.join(HERE, "ds_worker.py"), str(out), *CHECKS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return Results({name: json.load(open(out / f"ds_{name}.json")) for name in CHECKS})


def test_both_ascent_modes_match_their_references(results):
    for name in ("sam_local_1_z2", "sam_local_2_z1", "sam_global_2_z2"):
        r = results[name]
        mode = name.split("_")[1]
        other = "global" if mode == "local" else "local"
        assert r["engine"] == "DeepSpeedEngine" and r["zero_stage"] == int(name[-1])
        assert r[f"dev_vs_{mode}"] <= 1e-5, (name, r)
        assert r[f"dev_vs_{other}"] > 1e-3, (name, r)  # the two modes are told apart
    assert results["sam_local_1_z2"]["sync_ascent"] is None  # unset: per-device under DeepSpeed, as under DDP
    assert results["sam_local_2_z1"]["distinct_micro_batches"] == 12


def test_variants_under_deepspeed(results):
    for name in ("gsam_local_1_z1", "looksam_global_1_z2", "fsam_global_1_z1"):
        mode = name.split("_")[1]
        assert results[name][f"dev_vs_{mode}"] <= 1e-5, (name, results[name])


def test_weights_come_back_bit_for_bit(results):
    assert results["restored"] == {"sync1_bitwise_equal": True, "sync0_bitwise_equal": True}


def test_resume_equals_uninterrupted_run(results):
    r = results["resume"]
    assert r["resume_vs_uninterrupted"] <= 1e-6
    assert {"sam_state_rank0.pt", "sam_state_rank1.pt", "latest"} <= set(r["ckpt_files"])
