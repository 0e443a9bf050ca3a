"""scripts/bench.py: the peers are SAM, the memory tracker counts what a step allocates, every row prints."""

import copy
import os
import sys

import torch
from torch.utils.data import SequentialSampler
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import tiny

from hf_sam_scripts.memtrack import LiveBytes, reachable_tensor_bytes
from scripts import bench


def test_live_bytes_counts_new_storage_not_views():
    w = torch.zeros(1000)  # exists before the window: never counted
    with LiveBytes() as mem:
        a = torch.ones(1000)  # 4000 bytes
        v = w.view(10, 100).t()  # a view of old storage: 0
        b = a * 2  # 4000 more: peak 8000
        a.add_(1)  # in place: 0
        del a, b  # both freed
        c = torch.empty(500, dtype=torch.float64)  # 4000
    assert v.shape == (100, 10)
    assert mem.peak == 8000
    assert mem.live == 4000
    del c
    before = reachable_tensor_bytes()
    kept = [torch.zeros(250), torch.zeros(250)]  # two new storages: 2000 bytes
    view = kept[0][:10]  # no new storage
    assert reachable_tensor_bytes() - before == 2000
    del kept, view


def _reference_sam(model, batches, rho, lr):
    """Plain SAM with SGD, from the paper: e = rho g / ||g||, descend with grad L(w + e) at w."""
    params = list(model.parameters())
    for batch in batches:
        g = torch.autograd.grad(model(**batch)["loss"], params)
        norm = torch.sqrt(sum((x ** 2).sum() for x in g))
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, x in zip(params, g):
                p.add_(rho * x / (norm + 1e-12))
        g_adv = torch.autograd.grad(model(**batch)["loss"], params)
        with torch.no_grad():
            for p, s, x in zip(params, saved, g_adv):
                p.copy_(s - lr * x)
    return model


def test_peers_are_sam(tmp_path):
    data = tiny.Blobs(n=12)
    batches = [{"x": data.x[i:i + 4], "labels": data.y[i:i + 4]} for i in (0, 4, 8)]
    torch.manual_seed(0)
    init = tiny.MLP()
    ref = _reference_sam(copy.deepcopy(init), batches, rho=bench.RHO, lr=0.1)
    for peer in bench.PEERS:
        cls = bench.peer_trainer_class()
        cls.peer = peer
        cls._get_train_sampler = lambda self, *a, **k: SequentialSampler(self.train_dataset)
        model = copy.deepcopy(init)
        args = TrainingArguments(output_dir=str(tmp_path / peer), per_device_train_batch_size=4, max_steps=3,
                                 learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                                 report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
        cls(model=model, args=args, train_dataset=data).train()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=f"{peer}: {name}")


def test_bench_rows_and_sam_extra_memory_is_one_copy(capsys):
    rows = bench.main(["--models", "gpt2", "--variants", "sam", "--peers", "--steps", "3", "--warmup", "1",
                       "--in-process"])
    out = capsys.readouterr().out
    for label in ("stock", "sam", "pytorch_optimizer.SAM", "loop SAM"):
        assert any(line.startswith(label + " ") for line in out.splitlines()), (label, out)
    assert "n/a" not in out, out
    spec = {k: v for k, v in bench.PRESETS["tiny"]["gpt2"].items() if k not in ("seq", "batch")}
    param_bytes = sum(p.numel() * 4 for p in GPT2LMHeadModel(GPT2Config(**spec)).parameters())  # fp32, tied head
    peak = {r["variant"]: r["peak_mib"] * 2**20 for r in rows}
    for config in ("sam", "pto", "loop"):  # each holds one copy of the weights during the second pass
        extra = (peak[config] - peak["stock"]) / param_bytes
        assert abs(extra - 1.0) < 0.05, (config, extra)


def test_digits_mlp_model_and_named_configurations():
    """The studies' MLP trains on real digits batches; named configurations are valid SAM settings."""
    from hf_sam import SAMConfig

    model, data, batch = bench.build("mlp", bench.PRESETS["tiny"]["mlp"])
    assert batch == 32 and len(data) == 1257  # the studies' 70% training split
    x = torch.stack([d["x"] for d in data[:batch]])
    y = torch.stack([d["labels"] for d in data[:batch]])
    out = model(x=x, labels=y)
    assert out["logits"].shape == (batch, 10) and torch.isfinite(out["loss"])
    assert sum(p.numel() for p in model.parameters()) == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    for name, (variant, settings) in bench.CONFIGS.items():
        SAMConfig(variant=variant, **settings)
    assert bench.passes_of("looksam") == 1.2  # 2 every 5th step
    assert bench.passes_of("looksam_reuse") < 1 + 1e-6 and bench.passes_of("msam") == 1
    assert bench.passes_of("pto") == 2 and bench.passes_of("stock") == 1


def test_thread_choice(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert bench.default_threads() == 4 and bench.default_threads(2) == 2 and bench.default_threads(8) == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 0.0, 0.0))  # about three cores busy elsewhere
    assert bench.default_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert bench.default_threads() == 1
