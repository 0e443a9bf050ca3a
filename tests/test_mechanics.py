"""Invariants of the step: exact restore, GA accumulation, clean loss, selection, overflow, RNG, BatchNorm."""

import copy

import pytest
import torch
from transformers import Trainer

import tiny
from hf_sam import SAMConfig
from hf_sam.variants import register, unregister


def ready(tr, ga=1):
    """A trainer ready for direct training_step calls (what train() sets up)."""
    tr.create_optimizer()
    tr.current_gradient_accumulation_steps = ga
    return tr


def batch(n=4, seed=0, d_in=6):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, d_in, generator=g), "labels": torch.randint(0, 3, (n,), generator=g)}


def grads_of(model, inputs, scale=1.0):
    model.zero_grad(set_to_none=True)
    (model(**inputs)["loss"] * scale).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def sam_descent_grad(model, inputs, rho, scale=1.0):
    """grad of scale*L at w + rho g/||g|| (plain torch)."""
    m = copy.deepcopy(model)
    g = grads_of(m, inputs, scale)
    norm = torch.sqrt(sum((x ** 2).sum() for x in g.values()))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n in g:
                p.add_(rho * g[n] / (norm + 1e-12))
    return grads_of(m, inputs, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_bit_identical_after_step(tmp_path, dtype):
    model = tiny.MLP().to(dtype)
    tr = ready(tiny.trainer(tmp_path, model, sam_rho=0.5))
    before = tiny.params_copy(model)
    inputs = batch()
    inputs["x"] = inputs["x"].to(dtype)
    tr.training_step(model, inputs)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # bit-exact, also in bf16 where (w + e) - e != w


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fail_on_call", [1, 2])
def test_exception_in_a_pass_leaves_weights_and_grads_intact(tmp_path, fail_on_call):
    model = tiny.MLP()
    tr = ready(tiny.trainer(tmp_path, model, sam_rho=0.5), ga=2)
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] == fail_on_call:
            raise Boom("injected")

    model.fc1.register_forward_pre_hook(hook)
    earlier = {n: torch.full_like(p, 0.25) for n, p in model.named_parameters()}  # an earlier micro-batch
    for n, p in model.named_parameters():
        p.grad = earlier[n].clone()
    before = tiny.params_copy(model)
    with pytest.raises(Boom):
        tr.training_step(model, batch())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert torch.equal(p.grad, earlier[n]), n


def test_grad_accumulates_descent_gradient_and_returns_clean_loss(tmp_path):
    torch.manual_seed(0)
    model = tiny.MLP()
    tr = ready(tiny.trainer(tmp_path, model, sam_rho=0.3), ga=2)
    inputs = batch(seed=4)
    expected_desc = sam_descent_grad(model, inputs, 0.3, scale=0.5)
    clean = model(**inputs)["loss"].detach() / 2
    earlier = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = earlier[n].clone()
    loss = tr.training_step(model, inputs)
    assert torch.allclose(loss, clean, atol=1e-7, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, earlier[n] + expected_desc[n], atol=1e-6, rtol=0)


def test_rho_zero_reproduces_stock_trainer(tmp_path):
    torch.manual_seed(0)
    a = tiny.MLP(dropout=0.2)
    b = copy.deepcopy(a)
    data = tiny.Blobs()
    tiny.trainer(tmp_path / "sam", a, data, sam_rho=0.0, max_steps=4, gradient_accumulation_steps=2).train()
    stock = Trainer(model=b, args=tiny.args(tmp_path / "stock", max_steps=4, gradient_accumulation_steps=2),
                    train_dataset=data)
    stock._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(data)
    stock.train()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p - q).abs().max().item() <= 1e-7, n


def zero_radius(ctx):
    """SAM's mechanics with a zero perturbation: two passes, stash, no_sync, restore."""
    g = ctx.grad()
    e = ctx.ascent(g, rho=0.0)
    ctx.grad(at=e, final=True)


def test_two_pass_mechanics_with_zero_perturbation_equal_stock(tmp_path):
    register("zero_radius_test", replace=True)(zero_radius)
    try:
        torch.manual_seed(0)
        a = tiny.MLP(dropout=0.3)
        b = copy.deepcopy(a)
        data = tiny.Blobs()
        tiny.trainer(tmp_path / "sam", a, data, sam_variant="zero_radius_test", max_steps=4,
                     gradient_accumulation_steps=2, optim="adamw_torch", learning_rate=0.01).train()
        stock = Trainer(model=b, args=tiny.args(tmp_path / "stock", max_steps=4, gradient_accumulation_steps=2,
                                                optim="adamw_torch", learning_rate=0.01), train_dataset=data)
        stock._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(data)
        stock.train()
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            assert (p - q).abs().max().item() <= 1e-7, n
    finally:
        unregister("zero_radius_test")


def test_only_selected_parameters_move(tmp_path):
    model = tiny.MLP(unused=True)
    model.fc1.bias.requires_grad_(False)  # frozen
    tr = ready(tiny.trainer(tmp_path, model, sam_config=SAMConfig(rho=0.5, perturb_exclude=["^head\\."])))
    before = tiny.params_copy(model)
    seen = {}

    def record(module, args):
        seen[len(seen)] = tiny.params_copy(model)

    model.fc1.register_forward_pre_hook(record)
    tr.training_step(model, batch())
    assert len(seen) == 2
    during = seen[1]  # the perturbed pass
    assert not torch.equal(during["fc1.weight"], before["fc1.weight"])
    for name in ("head.weight", "head.bias", "fc1.bias", "unused.weight", "unused.bias"):
        assert torch.equal(during[name], before[name]), name


def test_nonfinite_ascent_gradient_skips_perturbation(tmp_path):
    model = tiny.MLP()
    tr = ready(tiny.trainer(tmp_path, model, sam_rho=0.5))
    inputs = batch()
    expected = grads_of(copy.deepcopy(model), inputs)  # e = 0: the descent gradient is the plain one
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == 1 else grad

    model.fc1.weight.register_hook(poison)
    finite_during = []
    model.fc1.register_forward_pre_hook(
        lambda m, a: finite_during.append(all(torch.isfinite(p).all() for p in model.parameters())))
    tr.training_step(model, inputs)
    assert finite_during == [True, True]
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-7, rtol=0)
    logs = tr._sam_collect_metrics()
    assert logs["sam/skipped"] == 1.0 and logs["sam/perturbation_norm"] == 0.0


def test_same_dropout_replays_rng(tmp_path):
    torch.manual_seed(0)
    model = tiny.MLP(dropout=0.5)
    register("zero_radius_test", replace=True)(zero_radius)
    try:
        for same, expect_zero in [(True, True), (False, False)]:
            tr = ready(tiny.trainer(tmp_path, model, sam_config=SAMConfig(variant="zero_radius_test",
                                                                          same_dropout=same)))
            torch.manual_seed(1)
            tr.training_step(model, batch())
            sharp = tr._sam_collect_metrics()["sam/sharpness"]
            assert (sharp == 0.0) == expect_zero
        # RNG after a SAM step equals the RNG after one stock step
        tr = ready(tiny.trainer(tmp_path, model, sam_rho=0.1))
        torch.manual_seed(7)
        tr.training_step(model, batch())
        after_sam = torch.get_rng_state()
        torch.manual_seed(7)
        model.zero_grad()
        model(**batch())["loss"].backward()
        assert torch.equal(after_sam, torch.get_rng_state())
    finally:
        unregister("zero_radius_test")


def test_batchnorm_statistics_come_from_the_clean_pass(tmp_path):
    torch.manual_seed(0)
    model = tiny.MLP(batchnorm=True)
    reference = copy.deepcopy(model).train()
    tr = ready(tiny.trainer(tmp_path, model, sam_rho=0.5))
    inputs = batch(n=8)
    reference(**inputs)  # one forward at w
    tr.training_step(model, inputs)
    assert torch.equal(model.bn.running_mean, reference.bn.running_mean)
    assert torch.equal(model.bn.running_var, reference.bn.running_var)
    assert model.bn.num_batches_tracked.item() == 1


def test_metrics_are_logged_and_match_the_definition(tmp_path):
    torch.manual_seed(0)
    model, data = tiny.MLP(), tiny.Blobs()
    init = copy.deepcopy(model)
    tr = tiny.trainer(tmp_path, model, data, sam_rho=0.2, max_steps=1, gradient_accumulation_steps=2)
    tr.train()
    log = tr.state.log_history[0]
    window = tiny.windows(data, 4, 2, 1)[0]
    sharp, norms = [], []
    for mb in window:
        g = grads_of(init, mb)
        norm = torch.sqrt(sum((x ** 2).sum() for x in g.values()))
        norms.append(norm.item())
        m = copy.deepcopy(init)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.add_(0.2 * g[n] / norm)
        sharp.append((m(**mb)["loss"] - init(**mb)["loss"]).item())
    assert log["sam/sharpness"] == pytest.approx(sum(sharp) / 2, abs=1e-6)
    assert log["sam/grad_norm"] == pytest.approx(sum(norms) / 2, rel=1e-5)
    assert log["sam/perturbation_norm"] == pytest.approx(0.2, rel=1e-6)
    assert log["sam/skipped"] == 0.0


def test_interval_runs_sam_on_every_kth_step_and_flops_count_passes(tmp_path):
    model = tiny.MLP()
    passes = []
    tr = tiny.trainer(tmp_path, model, sam_config=SAMConfig(rho=0.1, interval=3), max_steps=6)
    orig = tr._sam_run_pass

    def counting(*a, **k):
        passes.append(tr.state.global_step)
        return orig(*a, **k)

    tr._sam_run_pass = counting
    tr.train()
    assert passes == [0, 0, 3, 3]  # the other steps go through the plain stock step
    assert tr._sam.last_passes == 1


def test_floating_point_ops_count_both_passes(tmp_path):
    from test_reference import Tokens, tiny_gpt2

    flos = {}
    for rho in (0.0, 0.05):
        tr = tiny.trainer(tmp_path, tiny_gpt2(), Tokens(), sam_rho=rho, max_steps=2, per_device_train_batch_size=2)
        tr.train()
        flos[rho] = tr.state.total_flos
    assert flos[0.0] > 0 and flos[0.05] == 2 * flos[0.0]


def test_late_phase_window(tmp_path):
    model = tiny.MLP()
    seen = []
    tr = tiny.trainer(tmp_path, model, sam_config=SAMConfig(rho=0.1, start=0.5, end=0.75), max_steps=8)
    orig = tr._sam_run_pass
    tr._sam_run_pass = lambda *a, **k: (seen.append(tr.state.global_step), orig(*a, **k))[1]
    tr.train()
    assert sorted(set(s for s in seen if seen.count(s) == 2)) == [4, 5]


def test_sam_parameter_names_reports_the_selection(tmp_path):
    model = tiny.MLP()
    model.fc1.bias.requires_grad_(False)
    tr = tiny.trainer(tmp_path, model, sam_config=SAMConfig(perturb_exclude=["^head\\.bias$"]))
    assert tr.sam_parameter_names() == ["fc1.weight", "head.weight"]
    tr.create_optimizer()
    assert tr.sam_parameter_names() == ["fc1.weight", "head.weight"]
