"""Checkpoint and resume, bf16 autocast, model card."""

import copy

import pytest
import torch
from huggingface_hub import ModelCard

import tiny
from hf_sam import SAMConfig
from hf_sam.variants import register, unregister


def run(tmp_path, model, data, variant="sam", resume=None, **kw):
    tr = tiny.trainer(tmp_path, model, data, max_steps=6, save_strategy="steps", save_steps=3,
                      optim="adamw_torch", learning_rate=0.01, sam_variant=variant, **kw)
    tr.train(resume_from_checkpoint=resume)
    return tr


def counted(ctx):
    """A stateful test variant: rho grows with a counter kept in ctx.state (saved with checkpoints)."""
    n = ctx.state.get("calls", torch.zeros(()))
    ctx.state["calls"] = n + 1
    g = ctx.grad()
    ctx.grad(at=ctx.ascent(g, rho=0.05 * float(n + 1)), final=True)


@pytest.mark.parametrize("variant", ["sam", "counted_test"])
def test_resume_equals_uninterrupted_run(tmp_path, variant):
    register("counted_test", replace=True)(counted)
    try:
        torch.manual_seed(0)
        data = tiny.Blobs(n=64)
        a = tiny.MLP()
        b = copy.deepcopy(a)
        run(tmp_path / "full", a, data, variant)
        run(tmp_path / "part", b, data, variant)
        # resume a fresh model from checkpoint-3 of the second run
        c = tiny.MLP()
        resumed = run(tmp_path / "part", c, data, variant, resume=str(tmp_path / "part" / "checkpoint-3"))
        for (n, p), q in zip(a.named_parameters(), c.parameters()):
            assert torch.equal(p, q), n
        if variant == "counted_test":
            assert (tmp_path / "part" / "checkpoint-3" / "sam_state.pt").exists()
            assert resumed.sam_state["calls"].item() == 6
    finally:
        unregister("counted_test")


def test_bf16_autocast_trains_and_restores_exactly(tmp_path):
    torch.manual_seed(0)
    model, data = tiny.MLP(), tiny.Blobs()
    tr = tiny.trainer(tmp_path, model, data, bf16=True, max_steps=3, sam_rho=0.1)
    before = tiny.params_copy(model)
    tr.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    # exact restore inside the autocast path
    tr.current_gradient_accumulation_steps = 1
    snap = tiny.params_copy(model)
    tr.training_step(tr.model_wrapped, next(iter(tr.get_train_dataloader())))
    for n, p in model.named_parameters():
        assert torch.equal(p, snap[n]), n
    assert tr.state.log_history[0]["sam/perturbation_norm"] == pytest.approx(0.1, rel=1e-5)


def test_model_card(tmp_path):
    from test_reference import Tokens, tiny_gpt2

    tr = tiny.trainer(tmp_path, tiny_gpt2(), Tokens(), per_device_train_batch_size=2, max_steps=2,
                      sam_config=SAMConfig(variant="asam", rho=0.5, eta=0.02, interval=2))
    tr.train()
    tr.sam_reproduce_command = "python scripts/train_lm.py --sam_variant asam --sam_rho 0.5"
    tr.create_model_card(model_name="tiny-asam")
    card = ModelCard.load(tmp_path / "README.md")
    for tag in ("sam", "hf-sam", "asam", "generated_from_trainer"):
        assert tag in card.data.tags
    text = card.text
    for needle in ("| `variant` | asam |", "| `rho` | 0.5 |", "| `eta` | 0.02 |", "| `interval` | 2 |",
                   "| `perturb` | trainable |", "arXiv 2010.01412", "arXiv 2102.11600",
                   "GPT2LMHeadModel.from_pretrained", "train_lm.py --sam_variant asam", "learning_rate: 0.1",
                   "sam/sharpness"):
        assert needle in text, needle
    assert "mupp" not in card.data.tags


def test_model_card_for_a_plain_module(tmp_path):
    tr = tiny.trainer(tmp_path, tiny.MLP(), max_steps=1)
    tr.train()
    tr.create_model_card()
    text = (tmp_path / "README.md").read_text()
    assert "| `rho` | 0.05 |" in text and "load_state_dict" in text
