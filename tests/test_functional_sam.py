"""Functional-SAM against a plain-torch reference (torch.func vjp) and its exact limiting cases.

The reference re-derives the rule from the paper's equation in a few lines, independent of hf_sam:
g = grad L(w), e = rho a / ||a|| (a = g, or Adam-preconditioned g), dz = dL/dz at w, and the descent
gradient g_F = vjp of z(w + e) with dz; SGD / a hand-written Adam then update w.
"""

import gc
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vjp
from torch.utils.data import Dataset, SequentialSampler

from hf_sam import SAMConfig, SAMTrainer, SAMTrainingArguments

gc.collect()
gc.freeze()  # Trainer.train() runs gc.collect(); keep it cheap


class MLP(nn.Module):
    def __init__(self, hidden=True, linear_loss=False):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(4, 8) if hidden else None
        self.l2 = nn.Linear(8 if hidden else 4, 3)
        self.linear_loss = linear_loss

    def forward(self, x, labels=None):
        z = self.l2(torch.tanh(self.l1(x))) if self.l1 is not None else self.l2(x)
        out = {"logits": z}
        if labels is not None:
            out["loss"] = linear_loss(z, labels) if self.linear_loss else F.cross_entropy(z, labels)
        return out


def linear_loss(z, y):  # linear in the outputs: dL/dz does not depend on the weights
    c = torch.linspace(-1.0, 1.0, z.shape[-1])
    return (z * c).mean() + 0.0 * y.float().sum()


class Data(Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class InOrder(SAMTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def train(tmp_path, model, ds, *, steps=3, bs=4, ga=1, optim="sgd", lr=0.1, name="run", **sam):
    args = SAMTrainingArguments(
        output_dir=str(tmp_path / name), per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
        max_steps=steps, learning_rate=lr, optim=optim, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", seed=0,
        disable_tqdm=True, dataloader_drop_last=True)
    trainer = InOrder(model=model, args=args, train_dataset=ds, sam_config=SAMConfig(**sam))
    trainer.train()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---- the reference -----------------------------------------------------------------------------------
def reference(model, ds, loss_of_logits, *, rho, steps=3, bs=4, ga=1, lr=0.1, adam=None, functional=True,
              inputs=lambda b: {"x": b["x"]}):
    """Plain-torch Functional-SAM (functional=False: SAM) with SGD, or Adam when adam=(b1, b2, eps)."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    m = {k: torch.zeros_like(v) for k, v in w.items()}
    v2 = {k: torch.zeros_like(v) for k, v in w.items()}

    def logits(p, batch):
        return functional_call(model, p, args=(), kwargs=inputs(batch))["logits"]

    def loss(p, batch):
        return loss_of_logits(logits(p, batch), batch["labels"])

    n = len(ds)
    for t in range(steps):
        total = {k: torch.zeros_like(x) for k, x in w.items()}
        for j in range(ga):
            start = ((t * ga + j) * bs) % n
            batch = {k: torch.stack([ds[i][k] for i in range(start, start + bs)]) for k in ("x", "labels")}
            g = grad(loss)(w, batch)
            a = g
            if adam is not None and t > 0:
                b1, b2, eps = adam
                a = {k: g[k] / ((v2[k] / (1 - b2 ** t)).sqrt() + eps) for k in g}
            norm = torch.sqrt(sum((x.float() ** 2).sum() for x in a.values()))
            e = {k: rho * a[k] / (norm + 1e-12) for k in a}
            w_e = {k: w[k] + e[k] for k in w}
            if functional:
                dz = grad(lambda z: loss_of_logits(z, batch["labels"]))(logits(w, batch))
                _, pullback = vjp(lambda p: logits(p, batch), w_e)
                (d,) = pullback(dz)
            else:
                d = grad(loss)(w_e, batch)
            for k in total:
                total[k] += d[k] / ga
        for k in w:
            if adam is None:
                w[k] = w[k] - lr * total[k]
            else:
                b1, b2, eps = adam
                m[k] = b1 * m[k] + (1 - b1) * total[k]
                v2[k] = b2 * v2[k] + (1 - b2) * total[k] ** 2
                w[k] = w[k] - lr * (m[k] / (1 - b1 ** (t + 1))) / ((v2[k] / (1 - b2 ** (t + 1))).sqrt() + eps)
    return w


def max_dev(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---- tests -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ga", [1, 2])
def test_matches_vjp_reference_sgd(tmp_path, ga):
    ds = Data()
    got = train(tmp_path, MLP(), ds, ga=ga, bs=4 // ga, variant="functional_sam", rho=0.2)
    ref = reference(MLP(), ds, F.cross_entropy, rho=0.2, ga=ga, bs=4 // ga)
    assert max_dev(got, ref) < 1e-6
    sam = reference(MLP(), ds, F.cross_entropy, rho=0.2, ga=ga, bs=4 // ga, functional=False)
    assert max_dev(ref, sam) > 1e-4  # the rule differs from SAM here, so the comparison can fail


def test_adam_preconditioned_ascent_matches_reference(tmp_path):
    ds = Data()
    got = train(tmp_path, MLP(), ds, steps=4, optim="adamw_torch", lr=0.01, variant="functional_sam", rho=0.1,
                functional_sam_ascent="adam")
    ref = reference(MLP(), ds, F.cross_entropy, rho=0.1, steps=4, lr=0.01, adam=(0.9, 0.999, 1e-8))
    assert max_dev(got, ref) < 1e-6
    raw = reference(MLP(), ds, F.cross_entropy, rho=0.1, steps=4, lr=0.01, adam=None)
    assert max_dev(ref, raw) > 1e-4


@pytest.mark.parametrize("case", ["network linear in w", "loss linear in outputs"])
def test_exact_limits(tmp_path, case):
    # f(w) = W x + b: J does not depend on w, so g_F = J^T dL/dz(w) = grad L(w) whatever rho is (stock step);
    # a loss linear in z: dL/dz is constant, so g_F = J(w + e)^T dz = grad L(w + e) (SAM's descent gradient)
    ds = Data()
    make = (lambda: MLP(hidden=False)) if case == "network linear in w" else (lambda: MLP(linear_loss=True))
    got = train(tmp_path, make(), ds, variant="functional_sam", rho=0.5, name="f")
    sam = train(tmp_path, make(), ds, variant="sam", rho=0.5, name="sam")
    stock = train(tmp_path, make(), ds, variant="sam", rho=0.0, name="stock")
    assert max_dev(got, stock if case == "network linear in w" else sam) < 1e-6
    assert max_dev(sam, stock) > 1e-4  # SAM moves away from the stock step, so the limit is not trivial


def test_tiny_gpt2_matches_vjp_reference(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=37, n_positions=12, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)

    def new():
        torch.manual_seed(0)
        return GPT2LMHeadModel(cfg)

    class Tokens(Dataset):
        def __init__(self):
            self.ids = torch.randint(0, 37, (8, 12), generator=torch.Generator().manual_seed(3))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    ds = Tokens()

    def shifted_ce(z, labels):
        # next-token cross-entropy summed over the predicted tokens, divided as the Trainer divides it:
        # by num_items_in_batch, the label tokens of the batch counted before the shift
        ce = F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")
        return ce / labels.numel()

    got = train(tmp_path, new(), ds, steps=2, variant="functional_sam", rho=0.3, lr=0.5)
    ds.__class__.__getitem__ = lambda self, i: {"x": self.ids[i], "labels": self.ids[i]}
    ref = reference(new(), ds, shifted_ce, rho=0.3, steps=2, lr=0.5, inputs=lambda b: {"input_ids": b["x"]})
    assert max_dev(got, ref) < 2e-6
    sam = reference(new(), ds, shifted_ce, rho=0.3, steps=2, lr=0.5, inputs=lambda b: {"input_ids": b["x"]},
                    functional=False)
    assert max_dev(ref, sam) > 1e-5


def test_weights_restored_and_clean_loss_returned(tmp_path):
    ds = Data()
    model = MLP()
    args = SAMTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[],
                                use_cpu=True, max_steps=1, optim="sgd")
    trainer = SAMTrainer(model=model, args=args, train_dataset=ds,
                         sam_config=SAMConfig(variant="functional_sam", rho=0.3))
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1  # set by train(); this test calls training_step alone
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    batch = {"x": ds.x[:4], "labels": ds.y[:4]}
    loss = trainer.training_step(model, batch)
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        clean = F.cross_entropy(model(ds.x[:4])["logits"], ds.y[:4])
    assert math.isclose(loss.item(), clean.item(), rel_tol=1e-6)


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="functional_sam_ascent"):
        SAMConfig(variant="functional_sam", functional_sam_ascent="sgd")
    with pytest.raises(ValueError, match="functional_sam"):
        SAMConfig(variant="sam", functional_sam_ascent="adam")
    args = SAMTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, optim="sgd")
    with pytest.raises(ValueError, match="functional_sam_ascent='adam'"):
        SAMTrainer(model=MLP(), args=args, train_dataset=Data(),
                   sam_config=SAMConfig(variant="functional_sam", functional_sam_ascent="adam"))


def test_model_without_logits_is_refused(tmp_path):
    class NoLogits(MLP):
        def forward(self, x, labels=None):
            out = super().forward(x, labels)
            return {"loss": out["loss"], "scores": out["logits"]}

    args = SAMTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[],
                                use_cpu=True, max_steps=1, optim="sgd", save_strategy="no")
    trainer = SAMTrainer(model=NoLogits(), args=args, train_dataset=Data(),
                         sam_config=SAMConfig(variant="functional_sam"))
    with pytest.raises(ValueError, match="logits"):
        trainer.train()


def test_closure_optimizer_refuses_it():
    from hf_sam import SAM

    model = MLP()
    with pytest.raises(ValueError, match="functional_sam"):
        SAM(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1),
            config=SAMConfig(variant="functional_sam"), model=model)
