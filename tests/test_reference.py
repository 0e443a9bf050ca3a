"""SAM and ASAM against a reference written from the papers' equations in plain torch.

Reference (per micro-batch, m-sharpness with m = micro-batch):
    g = grad L_mb(w)                          L_mb scaled as the stock Trainer scales it
    SAM : e = rho * g / (||g|| + eps)
    ASAM: T = |w| + eta on tensors named *weight (1 elsewhere); e = rho * T^2 g / (||T g|| + eps)
    the descent gradient grad L_mb(w + e) is summed over the window, then the base optimizer steps.
"""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import tiny
from hf_sam import SAMConfig


def reference_run(model, batches, opt_name, lr, rho, eps=1e-12, adaptive=False, eta=0.01, clip=0.0,
                  loss_fn=None):
    model = copy.deepcopy(model)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    opt = (torch.optim.SGD(params, lr=lr) if opt_name == "sgd"
           else torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0))
    loss_fn = loss_fn or (lambda m, mb, window: m(**mb)["loss"] / len(window))
    for window in batches:
        total = [torch.zeros_like(p) for p in params]
        for mb in window:
            g = torch.autograd.grad(loss_fn(model, mb, window), params, allow_unused=True)
            g = [torch.zeros_like(p) if x is None else x for p, x in zip(params, g)]
            if adaptive:
                t = [p.detach().abs() + eta if n.endswith("weight") else torch.ones_like(p)
                     for n, p in zip(names, params)]
                norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
                e = [rho * ti * ti * gi / (norm + eps) for ti, gi in zip(t, g)]
            else:
                norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
                e = [rho * gi / (norm + eps) for gi in g]
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, ei in zip(params, e):
                    p.add_(ei)
            g_adv = torch.autograd.grad(loss_fn(model, mb, window), params, allow_unused=True)
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            total = [t + (0 if x is None else x) for t, x in zip(total, g_adv)]
        for p, t in zip(params, total):
            p.grad = t
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return dict(model.named_parameters())


def max_deviation(model, ref):
    return max((p.detach() - ref[n].detach()).abs().max().item() for n, p in model.named_parameters())


@pytest.mark.parametrize("variant,rho", [("sam", 0.05), ("asam", 0.5)])
@pytest.mark.parametrize("optim,lr", [("sgd", 0.1), ("adamw_torch", 0.01)])
@pytest.mark.parametrize("ga", [1, 2, 4])
def test_matches_reference(tmp_path, variant, rho, optim, lr, ga):
    torch.manual_seed(0)
    model, data = tiny.MLP(), tiny.Blobs(n=48)
    init = copy.deepcopy(model)
    steps = 3
    tr = tiny.trainer(tmp_path, model, data, gradient_accumulation_steps=ga, max_steps=steps, optim=optim,
                      learning_rate=lr, per_device_train_batch_size=4, sam_variant=variant, sam_rho=rho)
    tr.train()
    ref = reference_run(init, tiny.windows(data, 4, ga, steps), "sgd" if optim == "sgd" else "adamw", lr, rho,
                        adaptive=(variant == "asam"))
    assert max_deviation(model, ref) <= 1e-5
    # the update is really sharpness-aware: plain descent ends elsewhere
    plain = reference_run(init, tiny.windows(data, 4, ga, steps), "sgd" if optim == "sgd" else "adamw", lr, 0.0)
    assert max_deviation(model, plain) > 1e-4


def test_adaptive_flag_makes_sam_asam(tmp_path):
    torch.manual_seed(1)
    model, data = tiny.MLP(), tiny.Blobs()
    init = copy.deepcopy(model)
    tr = tiny.trainer(tmp_path, model, data, max_steps=2, sam_config=SAMConfig(rho=0.3, adaptive=True, eta=0.1))
    tr.train()
    ref = reference_run(init, tiny.windows(data, 4, 1, 2), "sgd", 0.1, 0.3, adaptive=True, eta=0.1)
    assert max_deviation(model, ref) <= 1e-5


def test_clipping_acts_on_the_descent_gradient(tmp_path):
    torch.manual_seed(2)
    model, data = tiny.MLP(), tiny.Blobs()
    init = copy.deepcopy(model)
    tiny.trainer(tmp_path, model, data, max_steps=3, max_grad_norm=0.05, learning_rate=0.5, sam_rho=0.2).train()
    ref = reference_run(init, tiny.windows(data, 4, 1, 3), "sgd", 0.5, 0.2, clip=0.05)
    assert max_deviation(model, ref) <= 1e-5


def tiny_gpt2():
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


class Tokens(torch.utils.data.Dataset):
    """Sequences with padding (labels -100) so micro-batches carry different token counts."""

    def __init__(self, n=16, length=12):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 50, (n, length), generator=g)
        self.labels = self.ids.clone()
        for i in range(n):
            self.labels[i, length - (i % 5):] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


@pytest.mark.parametrize("optim,lr", [("sgd", 0.5), ("adamw_torch", 1e-3)])
@pytest.mark.parametrize("ga", [1, 2])
def test_gpt2_num_items_in_batch_scaling(tmp_path, ga, optim, lr):
    """GPT-2 normalises its loss by the window's token count (num_items_in_batch); SAM keeps that scaling."""
    model, data = tiny_gpt2(), Tokens()
    init = copy.deepcopy(model)
    steps = 2
    tr = tiny.trainer(tmp_path, model, data, gradient_accumulation_steps=ga, max_steps=steps,
                      per_device_train_batch_size=2, optim=optim, learning_rate=lr, sam_rho=0.05)
    tr.train()

    def loss_fn(m, mb, window):
        # the stock Trainer's own token count for the window (its rule differs across versions)
        n_tokens = tr._get_num_items_in_batch(window, torch.device("cpu"))
        logits = m(input_ids=mb["input_ids"]).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), mb["labels"][:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum") / n_tokens

    ref = reference_run(init, tiny.windows(data, 2, ga, steps), "sgd" if optim == "sgd" else "adamw", lr, 0.05,
                        loss_fn=loss_fn)
    # (Adam turns rounding noise in near-zero gradient entries into lr-sized steps, hence its small lr here;
    # a wrong update would move weights by ~lr per step, 100x the tolerance)
    assert max_deviation(model, ref) <= 1e-5
