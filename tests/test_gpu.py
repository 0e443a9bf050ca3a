"""GPU-only checks (skipped without CUDA; run by scripts/gpu_checks.sh on a GPU machine)."""

import copy

import pytest
import torch

import tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_fp16_gradscaler_path_trains_like_fp32(tmp_path):
    """fp16 + GradScaler: ascent on scaled grads (never unscaled), one unscale before clipping."""
    from test_reference import max_deviation, reference_run

    torch.manual_seed(0)
    model, data = tiny.MLP(), tiny.Blobs(n=48)
    init = copy.deepcopy(model)
    tr = tiny.trainer(tmp_path, model, data, use_cpu=False, fp16=True, max_steps=3, max_grad_norm=1.0,
                      gradient_accumulation_steps=2, sam_rho=0.1)
    tr.train()
    assert tr.accelerator.scaler is not None
    ref = reference_run(init, tiny.windows(data, 4, 2, 3), "sgd", 0.1, 0.1, clip=1.0)
    assert max_deviation(model.cpu(), ref) <= 5e-3  # fp16 autocast vs fp32 reference
    log = tr.state.log_history[0]
    assert log["sam/perturbation_norm"] == pytest.approx(0.1, rel=1e-3)
    assert log["sam/grad_norm"] < 100  # reported unscaled (the loss scale is 65536)


def test_fp16_overflow_in_the_ascent_is_skipped_not_propagated(tmp_path):
    torch.manual_seed(0)
    model = tiny.MLP()
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == 1 else grad

    model.fc1.weight.register_hook(poison)
    tr = tiny.trainer(tmp_path, model, use_cpu=False, fp16=True, max_steps=2, sam_rho=0.1)
    tr.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert tr.state.log_history[0]["sam/skipped"] == 1.0
    assert not tr.accelerator.optimizer_step_was_skipped  # the descent was finite: the step ran
