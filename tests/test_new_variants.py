"""wsam, bsam, gcsam, zsharp, lookbehind, flat_lora against plain-torch references written from the papers'
equations (weights after a few optimizer steps, fp32, CPU, tolerance 1e-6), plus exact resume for the
stateful ones (bsam, lookbehind), the closure optimizer, rho = 0, bad input and the model card.

Each reference keeps its own copy of the model, computes gradients of the micro-batch mean loss with
torch.func.functional_call at the points the paper names, and steps torch.optim.SGD (or, for bSAM, its own
mean/precision update). Run with -s to print the measured deviations.
"""

import copy
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import tiny
from hf_sam import SAM, SAMConfig

TOL = 1e-6
EPS = 1e-12
BS = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def model0(seed=0):
    torch.manual_seed(seed)
    return tiny.MLP(d_hidden=8)


def data():
    return tiny.Blobs(n=96)


def run(tmp_path, variant, model, *, steps=3, ga=1, lr=0.1, momentum=0.9, save_steps=None, resume=None, **sam):
    kw = dict(sam_variant=variant, max_steps=steps, gradient_accumulation_steps=ga, learning_rate=lr,
              logging_steps=1000)
    if momentum:
        kw["optim_args"] = f"momentum={momentum}"
    if save_steps:
        kw.update(save_strategy="steps", save_steps=save_steps)
    kw.update({f"sam_{k}": v for k, v in sam.items()})
    tr = tiny.trainer(tmp_path, model, dataset=data(), **kw)
    tr.train(resume_from_checkpoint=resume)
    return tr


# ---- plain-torch helpers ------------------------------------------------------------------------
def grad(model, mb, at=None):
    """{name: grad of the mean loss at w + at} for the trainable parameters."""
    ps = {n: (p.detach() + at[n] if at is not None and n in at else p.detach()).requires_grad_(p.requires_grad)
          for n, p in model.named_parameters()}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    loss = functional_call(model, ps, (), mb)["loss"]
    return dict(zip(names, torch.autograd.grad(loss, [ps[n] for n in names])))


def norm(v):
    return torch.sqrt(sum((x.double() ** 2).sum() for x in v.values())).float()


def scaled(v, c):
    return {n: c * x for n, x in v.items()}


def replay(model, direction, *, steps=3, ga=1, lr=0.1, momentum=0.9, before_step=None):
    """SGD on a copy of `model` with the window mean of direction(model, mb, t, k) per step."""
    model = copy.deepcopy(model)
    named = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for t, window in enumerate(tiny.windows(data(), BS, ga, steps)):
        if before_step is not None:
            before_step(model, t)
        total = {n: torch.zeros_like(p) for n, p in named.items()}
        for k, mb in enumerate(window):
            for n, x in direction(model, mb, t, k).items():
                total[n] += x / ga
        for n, p in named.items():
            p.grad = total[n]
        opt.step()
    return model


def deviation(a, b):
    pb = dict(b.named_parameters())
    return max((p.detach() - pb[n].detach()).abs().max().item() for n, p in a.named_parameters())


def check(label, got, want, start):
    dev = deviation(got, want)
    print(f"{label}: max |w - w_ref| = {dev:.2e}")
    assert deviation(start, want) > 1e-3, f"{label}: the reference did not train"
    assert dev <= TOL, f"{label}: deviation {dev:.3e}"


def ref_generator(step, micro, seed=0, rank=0):
    digest = hashlib.sha256(f"hf_sam:{seed}:{step}:{micro}:{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# ---- directions from the papers ------------------------------------------------------------------
def wsam_d(rho, gamma):
    a = gamma / (1 - gamma)

    def d(model, mb, t, k):
        g = grad(model, mb)
        gt = grad(model, mb, scaled(g, rho / (norm(g) + EPS)))
        return {n: g[n] + a * (gt[n] - g[n]) for n in g}          # L + a (L(w + e) - L(w))
    return d


def centered(x):
    return x - x.mean(dim=tuple(range(1, x.dim())), keepdim=True) if x.dim() > 1 else x


def gcsam_d(rho, descent=False):
    def d(model, mb, t, k):
        gc = {n: centered(x) for n, x in grad(model, mb).items()}
        out = grad(model, mb, scaled(gc, rho / (norm(gc) + EPS)))
        return {n: centered(x) for n, x in out.items()} if descent else out
    return d


def zsharp_d(rho, q):
    def keep(x):
        z = (x - x.mean()) / x.std()                              # the z-score of the tensor
        a = z.abs().reshape(-1).sort().values
        return x * (z.abs() >= a[max(1, math.ceil(q * a.numel())) - 1])

    def d(model, mb, t, k):
        gf = {n: keep(x) for n, x in grad(model, mb).items()}
        return grad(model, mb, scaled(gf, rho / (norm(gf) + EPS)))
    return d


CASES = {
    "wsam": (dict(rho=0.3, wsam_gamma=0.8), wsam_d(0.3, 0.8)),
    "wsam-sam": (dict(rho=0.3, wsam_gamma=0.5), wsam_d(0.3, 0.5)),
    "gcsam": (dict(rho=0.3), gcsam_d(0.3)),
    "gcsam-descent": (dict(rho=0.3, gcsam_descent=True), gcsam_d(0.3, descent=True)),
    "zsharp": (dict(rho=0.3, zsharp_percentile=0.8), zsharp_d(0.3, 0.8)),
}


@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_against_reference(tmp_path, case, ga):
    settings, direction = CASES[case]
    start = model0()
    tr = run(tmp_path, case.split("-")[0], copy.deepcopy(start), ga=ga, **settings)
    check(f"{case} ga{ga}", tr.model, replay(start, direction, ga=ga), start)


# ---- bSAM: its own mean/precision update ----------------------------------------------------------
def bsam_reference(start, *, steps, ga, lr, rho, n, prior, b1=0.9, b2=0.999, damping=0.1, s0=1.0):
    model = copy.deepcopy(start)
    named = dict(model.named_parameters())
    delta = prior / n
    s = {k: torch.full_like(p, s0) for k, p in named.items()}
    gm = {k: torch.zeros_like(p) for k, p in named.items()}
    for t, window in enumerate(tiny.windows(data(), BS, ga, steps)):
        gs = {k: torch.zeros_like(p) for k, p in named.items()}
        ge = {k: torch.zeros_like(p) for k, p in named.items()}
        for micro, mb in enumerate(window):
            gen = ref_generator(t, micro)
            xi = {k: torch.randn(p.shape, generator=gen) * torch.sqrt(1.0 / (n * s[k])) for k, p in named.items()}
            g = grad(model, mb, xi)                                 # at the noisy sample
            g_e = grad(model, mb, {k: rho * g[k] / s[k] for k in g})  # at w + rho g / s
            for k in named:
                gs[k] += torch.sqrt(s[k]) * g[k].abs() / ga
                ge[k] += g_e[k] / ga
        with torch.no_grad():
            for k, p in named.items():
                gm[k] = b1 * gm[k] + (1 - b1) * (ge[k] + delta * p)
                p -= lr * gm[k] / s[k]
                s[k] = b2 * s[k] + (1 - b2) * (gs[k] + damping + delta)
    return model


@pytest.mark.parametrize("ga", [1, 2])
def test_bsam_against_reference(tmp_path, ga):
    start = model0()
    settings = dict(rho=0.05, bsam_prior_precision=10.0)
    tr = run(tmp_path, "bsam", copy.deepcopy(start), ga=ga, lr=0.2, momentum=0.0, **settings)
    ref = bsam_reference(start, steps=3, ga=ga, lr=0.2, rho=0.05, n=96, prior=10.0)
    check(f"bsam ga{ga}", tr.model, ref, start)


def test_bsam_refuses_other_optimizers(tmp_path):
    with pytest.raises(ValueError, match="needs SGD with momentum=0"):
        run(tmp_path, "bsam", model0(), momentum=0.9)
    with pytest.raises(ValueError, match="needs torch.optim.SGD"):
        tiny.trainer(tmp_path, model0(), optim="adamw_torch", sam_variant="bsam").train()
    with pytest.raises(ValueError, match="needs SGD with momentum=0"):
        SAM(model0().parameters(), torch.optim.SGD, SAMConfig(variant="bsam"), lr=0.1, momentum=0.9)


# ---- Lookbehind-SAM -----------------------------------------------------------------------------------
def lookbehind_reference(start, *, steps, ga, rho, k_steps, alpha, lr=0.1, momentum=0.9):
    """The paper's algorithm with one batch per inner step: slow phi, fast w, perturbed point w' = phi + E."""
    model = copy.deepcopy(start)
    named = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    slow = E = None
    for t, window in enumerate(tiny.windows(data(), BS, ga, steps)):
        with torch.no_grad():
            if t % k_steps == 0:
                if slow is not None:                             # phi <- phi + alpha (w_k - phi); w <- phi
                    slow = {n: slow[n] + alpha * (p - slow[n]) for n, p in named.items()}
                    for n, p in named.items():
                        p.copy_(slow[n])
                else:
                    slow = {n: p.detach().clone() for n, p in named.items()}
                E = {n: torch.zeros_like(p) for n, p in named.items()}
        total = {n: torch.zeros_like(p) for n, p in named.items()}
        step_e = {n: torch.zeros_like(p) for n, p in named.items()}
        for mb in window:
            base = {n: slow[n] + E[n] - p.detach() for n, p in named.items()}   # w' - w
            g = grad(model, mb, base)                           # gradient at w'_{i-1}
            e = scaled(g, rho / (norm(g) + EPS))
            d = grad(model, mb, {n: base[n] + e[n] for n in base})  # gradient at w'_{i-1} + e_i
            for n in named:
                total[n] += d[n] / ga
                step_e[n] += e[n] / ga
        E = {n: E[n] + step_e[n] for n in E}
        for n, p in named.items():
            p.grad = total[n]
        opt.step()
    return model


@pytest.mark.parametrize("ga", [1, 2])
def test_lookbehind_against_reference(tmp_path, ga):
    start = model0()
    tr = run(tmp_path, "lookbehind", copy.deepcopy(start), steps=7, ga=ga, rho=0.2, lookbehind_k=3,
             lookbehind_alpha=0.5)
    ref = lookbehind_reference(start, steps=7, ga=ga, rho=0.2, k_steps=3, alpha=0.5)
    check(f"lookbehind ga{ga}", tr.model, ref, start)


def test_lookbehind_k1_alpha1_is_sam(tmp_path):
    start = model0()
    a = run(tmp_path / "a", "lookbehind", copy.deepcopy(start), rho=0.2, lookbehind_k=1, lookbehind_alpha=1.0)
    b = run(tmp_path / "b", "sam", copy.deepcopy(start), rho=0.2)
    assert deviation(a.model, b.model) <= TOL


# ---- exact resume ---------------------------------------------------------------------------------------
RESUME = {
    "bsam": dict(momentum=0.0, lr=0.2, rho=0.05),
    "lookbehind": dict(rho=0.2, lookbehind_k=4, lookbehind_alpha=0.5),  # checkpoint in the middle of an outer step
}


@pytest.mark.parametrize("variant", list(RESUME))
def test_resume_is_exact(tmp_path, variant):
    settings = RESUME[variant]
    full = model0(3)
    run(tmp_path / "run", variant, full, steps=6, ga=2, save_steps=3, **settings)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "sam_state.pt").is_file()
    resumed = model0(4)  # other initial weights: everything must come from the checkpoint
    run(tmp_path / "run", variant, resumed, steps=6, ga=2, save_steps=3, resume=str(checkpoint), **settings)
    for n, p in full.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[n]), f"{variant}: {n} differs after resume"


# ---- the closure optimizer -------------------------------------------------------------------------------
CLOSURE = {
    "wsam": dict(rho=0.3, wsam_gamma=0.8),
    "gcsam": dict(rho=0.3),
    "zsharp": dict(rho=0.3, zsharp_percentile=0.8),
    "lookbehind": dict(rho=0.2, lookbehind_k=2),
    "bsam": dict(rho=0.05, bsam_num_data=96),
}


@pytest.mark.parametrize("ga", [1, 2])
@pytest.mark.parametrize("variant", list(CLOSURE))
def test_closure_optimizer_matches_the_trainer(tmp_path, variant, ga):
    settings = CLOSURE[variant]
    if variant == "bsam" and ga > 1:
        pytest.skip("bsam in hf_sam.SAM takes one micro-batch per step (test_bsam_closure_refuses_accumulation)")
    momentum = 0.0 if variant == "bsam" else 0.9
    start = model0()
    model = copy.deepcopy(start)
    trainer_settings = {k: v for k, v in settings.items() if k != "bsam_num_data"}
    tr = run(tmp_path, variant, copy.deepcopy(start), steps=3, ga=ga, momentum=momentum, **trainer_settings)
    opt = SAM(model.named_parameters(), torch.optim.SGD, SAMConfig(variant=variant, **settings), model=model,
              max_steps=3, seed=0, lr=0.1, momentum=momentum)
    tiny.closure_steps(opt, model, tiny.windows(data(), BS, ga, 3))
    assert deviation(start, tr.model) > 1e-3
    assert deviation(model, tr.model) <= TOL


def test_bsam_closure_needs_num_data():
    model = model0()
    opt = SAM(model.parameters(), torch.optim.SGD, SAMConfig(variant="bsam"), lr=0.1)
    before = tiny.params_copy(model)
    mb = tiny.windows(data(), BS, 1, 1)[0][0]

    def closure():
        loss = model(**mb)["loss"]
        loss.backward()
        return loss
    with pytest.raises(ValueError, match="bsam_num_data"):
        opt.step(closure)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_bsam_closure_refuses_accumulation():
    model = model0()
    opt = SAM(model.parameters(), torch.optim.SGD, SAMConfig(variant="bsam", bsam_num_data=96), lr=0.1)
    window = tiny.windows(data(), BS, 2, 1)[0]
    for k, mb in enumerate(window):
        def closure(mb=mb):
            loss = model(**mb)["loss"] / 2
            loss.backward()
            return loss
        if k == 0:
            opt.accumulate(closure)
            before = tiny.params_copy(model)
        else:
            with pytest.raises(ValueError, match="one micro-batch per step"):
                opt.accumulate(closure)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


# ---- rho = 0, limits, bit-exact restore, bad input -------------------------------------------------------
@pytest.mark.parametrize("variant,extra", [("wsam", {}), ("wsam", {"wsam_gamma": 0.0, "rho": 0.3}),
                                           ("gcsam", {}), ("zsharp", {}), ("lookbehind", {}),
                                           ("zsharp", {"zsharp_percentile": 0.0, "rho": 0.3})])
def test_limits(tmp_path, variant, extra):
    """rho = 0 is the stock SGD step; wsam gamma = 0 too; zsharp Q_p = 0 is SAM."""
    start = model0()
    settings = {"rho": 0.0, **extra}
    tr = run(tmp_path / "v", variant, copy.deepcopy(start), **settings)
    if variant == "zsharp" and extra:
        ref = run(tmp_path / "r", "sam", copy.deepcopy(start), rho=0.3).model
    else:
        ref = replay(start, lambda model, mb, t, k: grad(model, mb))
    assert deviation(tr.model, ref) <= TOL


def one_training_step_keeps_the_weights(tr):
    """One SAMTrainer.training_step; every parameter bit-identical afterwards. Returns the parameters."""
    tr.create_optimizer_and_scheduler(num_training_steps=3)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    snap = tiny.params_copy(tr.model)
    tr.training_step(tr.model_wrapped, next(iter(tr.get_train_dataloader())))
    for n, p in tr.model.named_parameters():
        assert torch.equal(p, snap[n]), n
    return list(tr.model.parameters())


@pytest.mark.parametrize("variant,extra", [("wsam", {}), ("gcsam", {"gcsam_descent": True}), ("zsharp", {}),
                                           ("bsam", {})])
def test_weights_restored_bit_exactly(tmp_path, variant, extra):
    tr = tiny.trainer(tmp_path, model0(), dataset=data(), sam_variant=variant, sam_rho=0.3,
                      **({"optim_args": None} if variant == "bsam" else {}), **{f"sam_{k}": v for k, v in extra.items()})
    for p in one_training_step_keeps_the_weights(tr):
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("settings,message", [
    (dict(variant="wsam", wsam_gamma=1.0), "wsam_gamma=1.0 is out of range"),
    (dict(variant="sam", wsam_gamma=0.7), "wsam_gamma is a setting of variant 'wsam'"),
    (dict(variant="zsharp", zsharp_percentile=1.5), "zsharp_percentile=1.5 is out of range"),
    (dict(variant="lookbehind", lookbehind_k=0), "lookbehind_k=0 is out of range"),
    (dict(variant="lookbehind", lookbehind_alpha=0.0), "lookbehind_alpha=0.0 is out of range"),
    (dict(variant="bsam", bsam_s_init=0.0), "bsam_s_init=0.0 is out of range"),
    (dict(variant="bsam", adaptive=True), "adaptive and rho_scaling do not apply"),
    (dict(variant="flat_lora", perturb="norm"), "perturbs the merged weight of every LoRA layer"),
    (dict(variant="flat_lora", flat_lora_ramp="linear"), "flat_lora_ramp='linear' is not allowed"),
])
def test_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SAMConfig(**settings)


def test_model_card_cites_the_papers(tmp_path):
    from hf_sam.cards import _papers

    for variant, arxiv in [("wsam", "2305.15817"), ("bsam", "2210.01620"), ("gcsam", "2501.11584"),
                           ("zsharp", "2505.02369"), ("flat_lora", "2409.14396"), ("lookbehind", "2307.16704")]:
        papers = _papers(SAMConfig(variant=variant))
        assert [p["arxiv"] for p in papers] == ["2010.01412", arxiv], variant
        assert papers[1]["bibtex"].startswith("@") and papers[1]["title"] and papers[1]["authors"]
    tr = run(tmp_path, "wsam", model0(), steps=1)
    tr.create_model_card()
    assert "arXiv 2305.15817" in (tmp_path / "README.md").read_text()


# ---- Flat-LoRA -----------------------------------------------------------------------------------------
def lora_model(seed=0):
    from peft import LoraConfig, get_peft_model

    base = model0(seed)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "head"], lora_dropout=0.0))
    with torch.no_grad():                         # B = 0 at init: give the adapters a start so W' != W0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
    return model


def ref_layer_seed(step, micro, layer, seed=0):
    digest = hashlib.sha256(f"hf_sam:flat_lora:{seed}:{step}:{micro}:{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def flat_lora_reference(start, *, steps, ga, rho, lr=0.1, momentum=0.9, ramp=True):
    """W' = W0 + s B A per LoRA layer; eps_r ~ N(0, (gamma_t rho ||W'_r|| / sqrt(d_in))^2) added to W0 for the pass."""
    model = copy.deepcopy(start)
    layers = [m for _, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=lr, momentum=momentum)
    for t, window in enumerate(tiny.windows(data(), BS, ga, steps)):
        gamma = 0.5 * (1 - math.cos(math.pi * t / steps)) if ramp else 1.0
        opt.zero_grad()
        for micro, mb in enumerate(window):
            saved = []
            with torch.no_grad():
                for index, m in enumerate(layers):
                    w0 = m.base_layer.weight
                    scale = m.scaling["default"]
                    merged = w0 + scale * m.lora_B["default"].weight @ m.lora_A["default"].weight
                    sigma = gamma * rho * merged.norm(dim=1) / math.sqrt(merged.shape[1])
                    gen = torch.Generator().manual_seed(ref_layer_seed(t, micro, index))
                    eps = torch.randn(merged.shape, generator=gen) * sigma[:, None]
                    saved.append(w0.clone())
                    w0 += eps
            (model(**mb)["loss"] / ga).backward()
            with torch.no_grad():
                for m, w in zip(layers, saved):
                    m.base_layer.weight.copy_(w)
        opt.step()
    return model


@pytest.mark.parametrize("ga,ramp", [(1, "cosine"), (2, "cosine"), (1, "constant")])
def test_flat_lora_against_reference(tmp_path, ga, ramp):
    start = lora_model()
    base = {n: p.detach().clone() for n, p in start.named_parameters() if not p.requires_grad}
    tr = run(tmp_path, "flat_lora", copy.deepcopy(start), steps=3, ga=ga, rho=0.5, flat_lora_ramp=ramp)
    ref = flat_lora_reference(start, steps=3, ga=ga, rho=0.5, ramp=ramp == "cosine")
    plain = run(tmp_path / "plain", "flat_lora", copy.deepcopy(start), steps=3, ga=ga, rho=0.0).model
    check(f"flat_lora ga{ga} {ramp}", tr.model, ref, start)
    assert deviation(tr.model, plain) > 1e-4                      # the noise changed the training
    for n, p in tr.model.named_parameters():                      # frozen base weights: bit-identical
        if n in base:
            assert torch.equal(p, base[n]), n
    mb = tiny.windows(data(), BS, 1, 1)[0][0]                     # no hook left behind
    with torch.no_grad():
        tr.model.eval()
        out = tr.model(**mb)["logits"]
        merged = copy.deepcopy(tr.model).merge_and_unload()
        assert torch.allclose(out, merged(**mb)["logits"], atol=1e-6)


def test_flat_lora_weights_bit_identical_after_a_step(tmp_path):
    tr = tiny.trainer(tmp_path, lora_model(), dataset=data(), sam_variant="flat_lora", sam_rho=0.5,
                      sam_flat_lora_ramp="constant")
    assert any(p.grad is not None for p in one_training_step_keeps_the_weights(tr))


def test_flat_lora_refuses_a_model_without_lora(tmp_path):
    model = model0()
    before = tiny.params_copy(model)
    with pytest.raises(ValueError, match="needs a PEFT LoRA model"):
        run(tmp_path, "flat_lora", model)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    with pytest.raises(ValueError, match="needs the Trainer"):
        SAM(model.parameters(), torch.optim.SGD, SAMConfig(variant="flat_lora"), lr=0.1)


def test_flat_lora_under_trl_sft(tmp_path):
    """with_sam(SFTTrainer) on a tiny Llama with PEFT LoRA: the noise changes training, the base stays bit-identical."""
    pytest.importorskip("trl")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from hf_sam import with_sam
    from test_trainers import TRL_PLAIN, sft_data, tokenizer

    def lora_llama():
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tokenizer()),
                                            max_position_embeddings=32, pad_token_id=0, bos_token_id=0,
                                            eos_token_id=0))
        model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
        return model

    def train(rho):
        model = lora_llama()
        args = SFTConfig(**dict(TRL_PLAIN, output_dir=str(tmp_path / str(rho)), per_device_train_batch_size=4,
                                max_steps=3, learning_rate=0.5, max_length=32))
        trainer = with_sam(SFTTrainer)(model=model, args=args, train_dataset=sft_data(), processing_class=tokenizer(),
                                       sam_config=SAMConfig(variant="flat_lora", rho=rho, flat_lora_ramp="constant"))
        trainer.train()
        return model

    start = lora_llama()
    noisy, plain = train(0.5), train(0.0)
    assert deviation(noisy, plain) > 1e-5
    frozen = {n: p for n, p in start.named_parameters() if not p.requires_grad}
    for n, p in noisy.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_flat_lora_refuses_conv1d_lora(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny.gpt2(), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(ValueError, match="supports LoRA on nn.Linear layers"):
        from hf_sam.variants.flat_lora import lora_layers
        lora_layers(model)
