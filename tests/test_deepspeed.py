"""SAMTrainer on DeepSpeed ZeRO-1/2: two gloo processes on the CPU (DS_ACCELERATOR=cpu), tests/ds_worker.py.

The Trainer's own DeepSpeed path (no forcing). One launch runs every trainer below (~30-40 s; the first
DeepSpeed run on a machine also builds DeepSpeed's shared-memory comm op once, a few minutes).
The references are the single-process ones of tests/fsdp_worker.py. Skipped without deepspeed.
"""

import pytest

pytest.importorskip("deepspeed")

from fsdp_worker import launch  # noqa: E402

CHECKS = ["sam_local_1_z2", "sam_local_2_z1", "sam_global_2_z2", "gsam_local_1_z1", "looksam_global_1_z2",
          "fsam_global_1_z1", "restored", "resume"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch("ds_worker.py", tmp_path_factory.mktemp("deepspeed"), CHECKS, 29625, "ds",
                  env={"DS_ACCELERATOR": "cpu"}, timeout=900)


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
