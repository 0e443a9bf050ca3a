"""SAMTrainer on HSDP (FSDP2 on a 2x2 replicate x shard mesh): four gloo processes on the CPU
(tests/hsdp_worker.py), one launch for every case, against single-process references written from the
equations (fsdp_worker.reference: global = the union of the 4 ranks' micro-batches, node = the union
of each shard group's {0, 1} and {2, 3}, local = each rank's own); and the same run launched as two
"nodes" of two processes (torchrun --nnodes 2, c10d rendezvous on 127.0.0.1) giving the same weights.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from fsdp_worker import HERE, Results, launch

CHECKS = ["sam_global_1", "sam_global_2", "sam_local_1", "sam_local_2", "sam_node_1", "sam_node_2", "asam_node_1",
          "gsam_node_1", "gsam_local_1", "resume", "restored", "node_on_1d_refused"]
TWO_NODE_CHECKS = ["sam_global_1", "sam_node_2"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("hsdp")
    res = launch("hsdp_worker.py", out, CHECKS, 29661, "hsdp", nproc=4, timeout=600)
    res.out = out
    return res


def test_hsdp_mesh_and_shard_groups(results):
    r = results["sam_global_1"]
    assert r["mesh_shape"] == [2, 2] and r["placements"] == "(Replicate(), Shard(dim=0))" and r["sharded"]
    assert r["shard_group"] == [0, 1] and r["ranks"] == 4


@pytest.mark.parametrize("mode", ["global", "local", "node"])
def test_each_ascent_mode_is_exact_and_differs_from_the_others(results, mode):
    for ga in (1, 2):
        r = results[f"sam_{mode}_{ga}"]
        assert r[f"dev_vs_{mode}"] <= 1e-6, (mode, ga, r)
        for other in {"global", "local", "node"} - {mode}:
            assert r[f"dev_vs_{other}"] > 1e-3, (mode, ga, other, r)  # the test tells the modes apart


def test_variants_in_node_mode(results):
    for name in ("asam_node_1", "gsam_node_1"):
        assert results[name]["dev_vs_node"] <= 1e-6, (name, results[name])
    assert results["gsam_local_1"]["dev_vs_local"] <= 1e-6  # an explicit per-device d reduced over both mesh dims


def test_resume_and_restore(results):
    r = results["resume"]
    assert r["resume_vs_uninterrupted"] <= 1e-6 and r["first_run_moved"] > 1e-4
    assert results["restored"] == {"sync1_bitwise_equal": True, "sync0_bitwise_equal": True}


def test_node_mode_needs_a_2d_mesh(results):
    msg = results["node_on_1d_refused"]["refused"]
    assert msg and "sync_ascent='node'" in msg and "2-D" in msg


def test_two_nodes_give_the_single_launch_weights(results, tmp_path):
    """torchrun --nnodes 2 --nproc_per_node 2 twice in the background, rendezvous on the loopback address."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
                               "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:29671",
                               "--rdzv_id", "hf_sam_hsdp", os.path.join(HERE, "hsdp_worker.py"), str(tmp_path),
                               *TWO_NODE_CHECKS], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    two = Results({n: json.load(open(tmp_path / f"hsdp_{n}.json")) for n in TWO_NODE_CHECKS})
    for name in TWO_NODE_CHECKS:
        assert two[name]["shard_group"] in ([0, 1], [2, 3])
        a, b = torch.load(tmp_path / f"weights_{name}.pt"), torch.load(results.out / f"weights_{name}.pt")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
