"""Two-process DDP on CPU (gloo) through torchrun: per-device ascent, one all-reduce per optimizer step."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    results = [{}, {}]
    for mode in ("local", "sync"):  # one trainer per launch
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               os.path.join(HERE, "ddp_worker.py"), str(out), mode]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        for r in range(2):
            results[r].update(json.load(open(out / f"result_{mode}_rank{r}.json")))
    return results


def test_ranks_agree_and_match_the_per_device_reference(ddp_results):
    r0, r1 = ddp_results
    assert r0["sync0"]["weights"] == r1["sync0"]["weights"]
    assert r0["sync0"]["distinct_batches"] == 12  # 2 ranks x 3 steps x 2 micro-batches, all different
    assert r0["sync0"]["max_dev_from_reference"] <= 1e-5


def test_ascent_triggers_no_all_reduce(ddp_results):
    for r in ddp_results:
        assert r["sync0"]["allreduces"] == 3  # one per optimizer step (3 steps, one bucket)
        # sync_ascent=True: every ascent all-reduces too, also on the first micro-batch of a window
        # (inside the Trainer's no_sync): 3 steps x (2 ascents + 1 descent)
        assert r["sync1"]["allreduces"] == 9
    assert ddp_results[0]["sync1"]["weights"] != ddp_results[0]["sync0"]["weights"]  # global ascent differs
