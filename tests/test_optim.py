"""hf_sam.SAM, the closure front-end: the same variants and step engine outside the Trainer.

Checked against a plain-torch reference of the papers' equations (test_reference.reference_run)
and against SAMTrainer on the same batches."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import tiny
from hf_sam import SAM, SAMConfig
from test_reference import max_deviation, reference_run

HERE = os.path.dirname(os.path.abspath(__file__))


def plain_loop(model, windows, config, lr=0.1, ga_api="step"):
    opt = SAM(model.named_parameters(), torch.optim.SGD, config=config, lr=lr)
    for window in windows:
        for k, mb in enumerate(window):
            def closure(mb=mb):
                loss = model(**mb)["loss"] / len(window)
                loss.backward()
                return loss

            if k < len(window) - 1 or ga_api == "accumulate":
                opt.accumulate(closure)
            else:
                opt.step(closure)
        if ga_api == "accumulate":
            opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("variant,adaptive,rho", [("sam", False, 0.1), ("asam", True, 0.5)])
@pytest.mark.parametrize("ga", [1, 2])
def test_plain_loop_matches_the_reference(variant, adaptive, rho, ga):
    model = tiny.MLP()
    init = copy.deepcopy(model)
    windows = tiny.windows(tiny.Blobs(), 4, ga, 3)
    plain_loop(model, windows, SAMConfig(variant=variant, rho=rho), ga_api="step" if ga == 1 else "accumulate")
    ref = reference_run(init, windows, "sgd", 0.1, rho, adaptive=adaptive)
    assert max_deviation(model, ref) <= 1e-6


@pytest.mark.parametrize("variant", ["sam", "asam", "fsam"])
def test_plain_loop_equals_samtrainer(tmp_path, variant):
    model = tiny.MLP()
    init = copy.deepcopy(model)
    config = SAMConfig(variant=variant, rho=0.2)
    tr = tiny.trainer(tmp_path, model, sam_config=config, max_steps=4, gradient_accumulation_steps=2)
    tr.train()
    looped = copy.deepcopy(init)
    opt = plain_loop(looped, tiny.windows(tiny.Blobs(), 4, 2, 4), config)
    assert max_deviation(looped, dict(model.named_parameters())) <= 1e-6
    if variant == "fsam":  # the stateful variant carries the same state
        assert set(opt.sam_state) == set(tr.sam_state) and opt.sam_state


def test_accelerate_loop_matches_the_reference():
    from accelerate import Accelerator

    model = tiny.MLP()
    init = copy.deepcopy(model)
    accelerator = Accelerator(cpu=True)
    opt = SAM(model.named_parameters(), torch.optim.SGD, config=SAMConfig(rho=0.1), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    windows = tiny.windows(tiny.Blobs(), 4, 1, 3)
    for (mb,) in windows:
        def closure(mb=mb):
            loss = model(**mb)["loss"]
            accelerator.backward(loss)
            return loss

        opt.step(closure)
        opt.zero_grad()
    ref = reference_run(init, windows, "sgd", 0.1, 0.1)
    assert max_deviation(accelerator.unwrap_model(model), ref) <= 1e-6
    assert opt.optimizer.metrics()["sam/perturbation_norm"] == pytest.approx(0.1, rel=1e-5)


def test_weights_restored_and_clean_loss_returned_when_the_closure_raises():
    model = tiny.MLP()
    before = tiny.params_copy(model)
    opt = SAM(model.named_parameters(), torch.optim.SGD, lr=0.1)
    mb = tiny.windows(tiny.Blobs(), 4, 1, 1)[0][0]
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        loss = model(**mb)["loss"]
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])  # bit-identical: restored by copy in a finally
    calls["n"] = 5
    opt.zero_grad()
    with torch.no_grad():
        clean = model(**mb)["loss"]
    loss = opt.step(closure)
    assert torch.equal(loss, clean)  # the returned loss is L(w), not the perturbed pass's


def test_state_dict_round_trip_continues_the_same_run():
    model = tiny.MLP()
    windows = tiny.windows(tiny.Blobs(n=64), 4, 1, 6)
    config = SAMConfig(variant="fsam", rho=0.2)
    full = copy.deepcopy(model)
    plain_loop(full, windows, config)
    first = copy.deepcopy(model)
    opt = plain_loop(first, windows[:3], config)
    saved = copy.deepcopy(opt.state_dict())
    resumed = copy.deepcopy(first)
    opt2 = SAM(resumed.named_parameters(), torch.optim.SGD, config=config, lr=0.1)
    opt2.load_state_dict(saved)
    for (mb,) in windows[3:]:
        def closure(mb=mb):
            loss = resumed(**mb)["loss"]
            loss.backward()
            return loss

        opt2.step(closure)
        opt2.zero_grad()
    assert max_deviation(resumed, dict(full.named_parameters())) <= 1e-6


def test_refusals_name_the_setting():
    model = tiny.MLP()
    with pytest.raises(ValueError, match="variant='saf' needs the Trainer"):
        SAM(model.named_parameters(), torch.optim.SGD, config=SAMConfig(variant="saf"), lr=0.1)
    with pytest.raises(ValueError, match="read parameter names"):
        SAM(model.parameters(), torch.optim.SGD, config=SAMConfig(variant="asam"), lr=0.1)
    with pytest.raises(ValueError, match="pass max_steps="):
        SAM(model.named_parameters(), torch.optim.SGD, config=SAMConfig(start=0.5), lr=0.1)
    with pytest.raises(TypeError, match="pass the class"):
        SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), lr=0.1)


def test_two_process_ddp_per_device_ascent(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "optim_ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.load(open(tmp_path / f"optim_rank{r}.json")) for r in range(2))
    assert r0["weights"] == r1["weights"]
    assert r0["max_dev_from_reference"] <= 1e-6
    assert r0["allreduces"] == 3  # one bucket per step: the ascent passes ran under no_sync
