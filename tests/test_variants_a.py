"""Group-A variants (gsam, fsam, looksam, esam, ssam, msam, crsam) against references written from
the papers' equations in plain torch, their limiting cases, exact resume, cost and bad input.

Every reference works on one flat parameter vector (in the optimizer's parameter order, the order
the variants' random draws follow) and replays the micro-batches the in-order trainer sees:
per micro-batch a descent direction d (in units of the micro-batch mean loss), summed over the
window with weight 1 / GA, then the base optimizer (torch SGD with momentum 0.9, or AdamW) steps.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import tiny
from hf_sam import SAMConfig
from hf_sam.losses import per_sample_loss, select_samples

EPS = 1e-12
TOL = 1e-5
DEVIATIONS = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest (and undisturbed by busy neighbours) on one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- driving SAMTrainer ---------------------------------------------------------------------------
def model0(seed=0):
    torch.manual_seed(seed)
    return tiny.MLP(d_hidden=8)


def train(tmp_path, variant, model, *, optim="sgd", ga=1, steps=4, lr=0.1, sched="constant", resume=None,
          save_steps=None, **sam):
    kw = dict(optim=optim, gradient_accumulation_steps=ga, max_steps=steps, learning_rate=lr,
              lr_scheduler_type=sched, sam_variant=variant, logging_steps=1000)
    kw.update({f"sam_{k}": v for k, v in sam.items()})
    if optim == "sgd":
        kw["optim_args"] = "momentum=0.9"
    if save_steps:
        kw.update(save_strategy="steps", save_steps=save_steps)
    tr = tiny.trainer(tmp_path, model, **kw)
    tr.train(resume_from_checkpoint=resume)
    return tr


def optimizer_order(tr):
    name_of = {id(p): n for n, p in tr.model.named_parameters()}
    return [name_of[id(p)] for group in tr.optimizer.param_groups for p in group["params"]]


# ---- the plain-torch reference ----------------------------------------------------------------------
class Flat:
    """A model's parameters as one flat vector; gradients of (per-sample) losses at w + offset."""

    def __init__(self, model, order):
        self.model, self.order = model, order
        self.params = dict(model.named_parameters())
        self.shapes = [self.params[n].shape for n in order]
        self.sizes = [self.params[n].numel() for n in order]
        starts = [0]
        for s in self.sizes:
            starts.append(starts[-1] + s)
        self.slices = {n: slice(a, b) for n, a, b in zip(order, starts, starts[1:])}
        self.n = starts[-1]

    def w(self):
        return torch.cat([self.params[n].detach().reshape(-1) for n in self.order])

    def _tensors(self, flat):
        return [t.view(s) for t, s in zip(torch.split(flat, self.sizes), self.shapes)]

    def outputs(self, mb, offset=None, requires_grad=False):
        flat = self.w() if offset is None else self.w() + offset
        ts = [t.clone().requires_grad_(requires_grad) for t in self._tensors(flat)]
        return ts, functional_call(self.model, dict(zip(self.order, ts)), (), mb)

    def grad(self, mb, offset=None, reduce=None):
        """grad of reduce(outputs) (default: the model's mean loss) at w + offset, flat."""
        ts, out = self.outputs(mb, offset, requires_grad=True)
        loss = out["loss"] if reduce is None else reduce(out)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, ts)])

    def per_sample(self, mb, offset=None):
        with torch.no_grad():
            _, out = self.outputs(mb, offset)
        return F.cross_entropy(out["logits"], mb["labels"], reduction="none")


def replay(model, order, windows, optim, lr, direction, lr_factor=lambda t: 1.0):
    model = copy.deepcopy(model)
    ref = Flat(model, order)
    params = [ref.params[n] for n in order]
    opt = (torch.optim.SGD(params, lr=lr, momentum=0.9) if optim == "sgd"
           else torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0))
    state = {"opt": opt, "params": params}
    for t, window in enumerate(windows):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(t)
        total = torch.zeros(ref.n)
        for k, mb in enumerate(window):
            total += direction(ref, mb, t, k, state) / len(window)
        for p, g in zip(params, ref._tensors(total)):
            p.grad = g.clone()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def deviation(model, ref):
    return max((p.detach() - ref[n]).abs().max().item() for n, p in model.named_parameters())


def unit(v):
    return v / (v.norm() + EPS)


# ---- directions from the papers' equations ------------------------------------------------------------
def sam_d(rho):
    def d(ref, mb, t, k, state):
        g = ref.grad(mb)
        return ref.grad(mb, rho * unit(g))
    return d


def gsam_d(rho, rho_min, alpha, steps):
    def d(ref, mb, t, k, state):
        lr_frac = (steps - t) / steps  # linear schedule, no warmup, lr_min = 0
        rho_t = rho if rho_min is None else rho_min + (rho - rho_min) * lr_frac
        g = ref.grad(mb)
        g_adv = ref.grad(mb, rho_t * unit(g))
        u = g_adv / g_adv.norm()
        g_perp = g - (g @ u) * u
        return g_adv - alpha * g_perp
    return d


def fsam_d(rho, sigma, lam):
    def d(ref, mb, t, k, state):
        g = ref.grad(mb)
        if "m" not in state:
            dt, state["m"] = g, g.clone()
        else:
            dt = g - sigma * state["m"]
            state["m"] = lam * state["m"] + (1 - lam) * g
        return ref.grad(mb, rho * unit(dt))
    return d


def looksam_d(rho, k_every, alpha):
    def d(ref, mb, t, k, state):
        g = ref.grad(mb)
        if t % k_every == 0:
            g_s = ref.grad(mb, rho * unit(g))
            cos = (g @ g_s) / (g.norm() * g_s.norm())
            g_v = g_s - g_s.norm() * cos * g / g.norm()
            state["gv"] = g_v if k == 0 else state["gv"] + g_v
            return g_s
        return g + alpha * g.norm() / state["gv"].norm() * state["gv"]
    return d


def esam_d(rho, beta, gamma, seed=0):
    def d(ref, mb, t, k, state):
        gen = state.setdefault("gen", torch.Generator().manual_seed(seed))
        draws = torch.rand(len(ref.order), generator=gen)
        kept = [n for n, u in zip(ref.order, draws.tolist()) if u < beta]
        state.setdefault("kept", []).append(kept)
        if not kept:
            return ref.grad(mb)
        mask = torch.zeros(ref.n)
        for n in kept:
            mask[ref.slices[n]] = 1.0
        g_s = ref.grad(mb) * mask
        e = rho * g_s / (beta * (g_s.norm() + EPS))
        n_mb = len(mb["labels"])
        k_sel = max(1, math.floor(gamma * n_mb))
        if k_sel >= n_mb:
            return ref.grad(mb, e)
        increase = ref.per_sample(mb, e) - ref.per_sample(mb)
        top = torch.topk(increase, k_sel).indices
        return ref.grad(mb, e, reduce=lambda out: F.cross_entropy(out["logits"], mb["labels"],
                                                                  reduction="none")[top].mean())
    return d


def topk_mask(scores, keep):
    m = torch.zeros_like(scores)
    m[torch.topk(scores, keep).indices] = 1.0
    return m


def ssam_fisher_d(rho, sparsity, interval, samples):
    def d(ref, mb, t, k, state):
        g = ref.grad(mb)
        if t % interval == 0 and k == 0:
            fisher = torch.zeros(ref.n)
            for j in range(min(samples, len(mb["labels"]))):
                fisher += ref.grad({key: v[j:j + 1] for key, v in mb.items()}) ** 2
            state["mask"] = topk_mask(fisher, int(ref.n * (1 - sparsity)))
        return ref.grad(mb, rho * g * state["mask"] / (g.norm() + EPS))
    return d


def ssam_dynamic_d(rho, sparsity, interval, drop, steps, seed=0):
    def d(ref, mb, t, k, state):
        gen = state.setdefault("gen", torch.Generator().manual_seed(seed))
        g = ref.grad(mb)
        n = ref.n
        if "mask" not in state:
            state["mask"] = topk_mask(torch.rand(n, generator=gen), n - math.ceil(n * sparsity))
        mask = state["mask"]
        e = rho * g * mask / (g.norm() + EPS)          # the ascent uses the mask before the update
        if t % interval == 0 and k == 0:
            rate = drop * (1 + math.cos(math.pi * t / steps)) / 2
            dense = n - n * sparsity
            keep = topk_mask((g.abs() + 1e-7) * mask, int(dense * (1 - rate)))
            grow = topk_mask((torch.rand(n, generator=gen) + 1e-7) * (1 - mask), int(min(dense * rate, n * sparsity)))
            state["mask"] = ((keep + grow) > 0).float()
        return ref.grad(mb, e)
    return d


def msam_d(rho):
    def d(ref, mb, t, k, state):
        opt, params = state["opt"], state["params"]
        key = "momentum_buffer" if isinstance(opt, torch.optim.SGD) else "exp_avg"
        if not opt.state:
            return ref.grad(mb)
        m = torch.cat([opt.state[p][key].reshape(-1) for p in params])
        return ref.grad(mb, -rho * m / (m.norm() + EPS))
    return d


def crsam_d(rho, gamma, beta):
    def d(ref, mb, t, k, state):
        g0 = ref.grad(mb)
        e = rho * unit(g0)
        gp, gm = ref.grad(mb, e), ref.grad(mb, -e)
        return gp + gamma * (gp + gm - 2 * g0) + beta * (gp - gm)
    return d


# ---- reference tests -----------------------------------------------------------------------------------
STEPS = 4
CASES = {
    # name: (variant, sam settings, direction factory (steps) -> d, schedule)
    "gsam": ("gsam", dict(rho=0.5, gsam_alpha=0.4, gsam_rho_min=0.1),
             lambda: gsam_d(0.5, 0.1, 0.4, STEPS), "linear"),
    "fsam": ("fsam", dict(rho=0.5, fsam_sigma=1.0, fsam_lambda=0.6), lambda: fsam_d(0.5, 1.0, 0.6), "constant"),
    "looksam": ("looksam", dict(rho=0.5, looksam_k=2, looksam_alpha=0.7), lambda: looksam_d(0.5, 2, 0.7),
                "constant"),
    "esam": ("esam", dict(rho=0.5, esam_beta=0.5, esam_gamma=0.5), lambda: esam_d(0.5, 0.5, 0.5), "constant"),
    "ssam-fisher": ("ssam", dict(rho=0.5, ssam_sparsity=0.5, ssam_update_interval=2, ssam_fisher_samples=3),
                    lambda: ssam_fisher_d(0.5, 0.5, 2, 3), "constant"),
    "ssam-dynamic": ("ssam", dict(rho=0.5, ssam_sparsity=0.4, ssam_mask="dynamic", ssam_update_interval=2,
                                  ssam_drop_rate=0.5),
                     lambda: ssam_dynamic_d(0.5, 0.4, 2, 0.5, STEPS), "constant"),
    "msam": ("msam", dict(rho=1.0), lambda: msam_d(1.0), "constant"),
    "crsam": ("crsam", dict(rho=0.5, crsam_gamma=0.3, crsam_beta=0.2), lambda: crsam_d(0.5, 0.3, 0.2), "constant"),
}
COMBOS = [("sgd", 1), ("adamw_torch", 2), ("sgd", 2), ("adamw_torch", 1)]


def linear(t, steps=STEPS):
    return (steps - t) / steps


@pytest.mark.parametrize("optim,ga", COMBOS, ids=[f"{o}-ga{g}" for o, g in COMBOS])
@pytest.mark.parametrize("case", list(CASES))
def test_against_reference(tmp_path, case, optim, ga):
    variant, settings, make_d, sched = CASES[case]
    lr = 0.1 if optim == "sgd" else 0.01
    model = model0()
    start = copy.deepcopy(model)
    tr = train(tmp_path, variant, model, optim=optim, ga=ga, steps=STEPS, lr=lr, sched=sched, **settings)
    windows = tiny.windows(tiny.Blobs(), 4, ga, STEPS)
    factor = linear if sched == "linear" else (lambda t: 1.0)
    ref = replay(start, optimizer_order(tr), windows, optim, lr, make_d(), factor)
    dev = deviation(model, ref)
    moved = deviation(start, ref)
    DEVIATIONS[f"{case}/{optim}/ga{ga}"] = dev
    assert moved > 1e-3  # the run did train
    assert dev <= TOL, f"{case}: deviation {dev:.2e} from the reference"


def test_esam_draws_are_mixed():
    """The reference test's seed exercises partial tensor sets (not all kept, not all dropped)."""
    gen = torch.Generator().manual_seed(0)
    kept = [(torch.rand(4, generator=gen) < 0.5).sum().item() for _ in range(8)]
    assert any(0 < k < 4 for k in kept)


# ---- limiting cases: the variant reduces to SAM ---------------------------------------------------------
LIMITS = {
    "gsam": dict(rho=0.5, gsam_alpha=0.0),
    "fsam": dict(rho=0.5, fsam_sigma=0.0),
    "looksam": dict(rho=0.5, looksam_k=1),
    "esam": dict(rho=0.5, esam_beta=1.0, esam_gamma=1.0),
    "ssam": dict(rho=0.5, ssam_sparsity=0.0),
    "crsam": dict(rho=0.5, crsam_gamma=0.0, crsam_beta=0.0),
}


@pytest.mark.parametrize("variant", list(LIMITS))
def test_limit_is_sam(tmp_path, variant):
    model = model0(1)
    start = copy.deepcopy(model)
    tr = train(tmp_path, variant, model, optim="sgd", ga=2, steps=3, **LIMITS[variant])
    ref = replay(start, optimizer_order(tr), tiny.windows(tiny.Blobs(), 4, 2, 3), "sgd", 0.1, sam_d(0.5))
    dev = deviation(model, ref)
    DEVIATIONS[f"{variant}-limit"] = dev
    assert dev <= TOL


def test_gsam_constant_rho_without_rho_min(tmp_path):
    """gsam_rho_min=None keeps rho constant also under a decaying LR."""
    model = model0(2)
    start = copy.deepcopy(model)
    tr = train(tmp_path, "gsam", model, optim="sgd", steps=3, sched="linear", rho=0.5, gsam_alpha=0.4)
    ref = replay(start, optimizer_order(tr), tiny.windows(tiny.Blobs(), 4, 1, 3), "sgd", 0.1,
                 gsam_d(0.5, None, 0.4, 3), lambda t: linear(t, 3))
    assert deviation(model, ref) <= TOL


# ---- resume: a run resumed from checkpoint-3 ends where the uninterrupted run ends ------------------------
RESUME = {
    "gsam": dict(sched="linear", rho=0.5, gsam_rho_min=0.1),
    "fsam": dict(rho=0.5),
    "looksam": dict(rho=0.5, looksam_k=2),
    "esam": dict(rho=0.5),
    "ssam-fisher": dict(rho=0.5, ssam_update_interval=2, ssam_fisher_samples=2),
    "ssam-dynamic": dict(rho=0.5, ssam_mask="dynamic", ssam_update_interval=2),
}


@pytest.mark.parametrize("case", list(RESUME))
def test_resume_is_exact(tmp_path, case):
    variant = case.split("-")[0]
    settings = dict(RESUME[case])
    full = model0(3)
    tr = train(tmp_path / "run", variant, full, optim="adamw_torch", lr=0.01, ga=2, steps=6, save_steps=3,
               **settings)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    if variant != "gsam":  # gsam's schedule is a function of the LR: nothing to store
        assert (checkpoint / "sam_state.pt").is_file()
    resumed = model0(4)  # other initial weights: everything must come from the checkpoint
    train(tmp_path / "run", variant, resumed, optim="adamw_torch", lr=0.01, ga=2, steps=6, save_steps=3,
          resume=str(checkpoint), **settings)
    for n, p in full.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[n]), f"{case}: {n} differs after resume"
    assert tr.state.global_step == 6


# ---- cost: forward passes per micro-batch ------------------------------------------------------------------
def count_forwards(model):
    sizes = []
    model.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(len(kwargs["x"])), with_kwargs=True)
    return sizes


def test_looksam_one_pass_between_refreshes(tmp_path):
    model = model0()
    sizes = count_forwards(model)
    train(tmp_path, "looksam", model, steps=4, looksam_k=3)
    assert len(sizes) == 2 + 1 + 1 + 2  # refresh at steps 0 and 3


def test_msam_one_pass(tmp_path):
    model = model0()
    sizes = count_forwards(model)
    train(tmp_path, "msam", model, steps=3, ga=2, rho=2.0)
    assert len(sizes) == 3 * 2


def test_crsam_three_passes(tmp_path):
    model = model0()
    sizes = count_forwards(model)
    tr = train(tmp_path, "crsam", model, steps=2)
    assert len(sizes) == 3 * 2
    assert tr._sam.last_passes == 3


def test_esam_descends_on_the_selected_samples(tmp_path):
    model = model0()
    sizes = count_forwards(model)
    train(tmp_path, "esam", model, steps=3, esam_beta=1.0, esam_gamma=0.5)
    assert sizes == [4, 4, 2] * 3  # clean pass, no-grad forward at w + e, descent on gamma * n samples


def test_esam_clean_pass_skips_the_unkept_tensors(tmp_path):
    """SWP saves backward work: a tensor that is not drawn gets no gradient in the clean pass."""
    model = model0()
    counts = {n: 0 for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        p.register_hook(lambda grad, n=n: counts.__setitem__(n, counts[n] + 1))
    tr = train(tmp_path, "esam", model, steps=4, esam_beta=0.5, esam_gamma=1.0)
    order = optimizer_order(tr)
    gen = torch.Generator().manual_seed(0)  # args.seed
    expected = dict.fromkeys(order, 0)
    for _ in range(4):
        kept = [n for n, u in zip(order, torch.rand(len(order), generator=gen).tolist()) if u < 0.5]
        for n in order:
            expected[n] += 1 + (n in kept)  # descent pass for all, clean pass for the kept ones
    assert counts == expected
    assert min(expected.values()) < max(expected.values())


STEP_CASES = [("gsam", dict(sam_gsam_rho_min=0.01)), ("fsam", {}), ("looksam", dict(sam_looksam_k=2)),
              ("esam", {}), ("ssam", dict(sam_ssam_fisher_samples=2)), ("ssam", dict(sam_ssam_mask="dynamic")),
              ("msam", dict(optim="adamw_torch")), ("crsam", {})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant,extra", STEP_CASES, ids=[f"{v}-{i}" for i, (v, _) in enumerate(STEP_CASES)])
def test_weights_restored_bit_exactly(tmp_path, variant, extra, dtype):
    """Invariant 1 for every variant: after training_step the weights are bit-identical (bf16 too)."""
    model = tiny.MLP(d_hidden=8).to(dtype)
    tr = tiny.trainer(tmp_path, model, sam_variant=variant, sam_rho=0.5, **extra)
    tr.create_optimizer_and_scheduler(num_training_steps=4)
    tr.current_gradient_accumulation_steps = 2
    data = tiny.Blobs()
    for step in range(3):
        for k in range(2):
            mb = {key: v[(2 * step + k) * 4:(2 * step + k + 1) * 4] for key, v in
                  {"x": data.x.to(dtype), "labels": data.y}.items()}
            before = tiny.params_copy(model)
            tr.training_step(model, mb)
            for n, p in model.named_parameters():
                assert torch.equal(p, before[n]), n
                assert torch.isfinite(p.grad).all(), n
        tr.optimizer.step()
        tr.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
        tr.state.global_step += 1


# ---- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings,message", [
    (dict(variant="sam", gsam_alpha=0.3), "gsam_alpha is a setting of variant 'gsam'"),
    (dict(variant="sam", fsam_sigma=0.5), "variant 'fsam'"),
    (dict(variant="gsam", gsam_alpha=-0.1), "allowed: a finite number >= 0"),
    (dict(variant="gsam", rho=0.05, gsam_rho_min=0.1), "must not exceed rho"),
    (dict(variant="looksam", looksam_k=0), "allowed: an integer >= 1"),
    (dict(variant="looksam", looksam_alpha=-1.0), "allowed: a finite number >= 0"),
    (dict(variant="esam", esam_beta=0.0), "allowed: a number in (0, 1]"),
    (dict(variant="esam", esam_gamma=1.5), "allowed: a number in (0, 1]"),
    (dict(variant="ssam", ssam_sparsity=1.0), "allowed: a number in [0, 1)"),
    (dict(variant="ssam", ssam_sparsity=-0.1), "allowed: a number in [0, 1)"),
    (dict(variant="ssam", ssam_mask="random"), "choose one of fisher, dynamic"),
    (dict(variant="ssam", ssam_mask="dynamic", ssam_fisher_samples=8), "only has an effect when ssam_mask"),
    (dict(variant="ssam", ssam_update_interval=0), "allowed: an integer >= 1"),
    (dict(variant="fsam", fsam_lambda=1.5), "allowed: a number in [0, 1]"),
    (dict(variant="crsam", crsam_gamma=float("nan")), "crsam_gamma"),
])
def test_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        SAMConfig(**settings)


@pytest.mark.parametrize("optim,optim_args", [("sgd", None), ("sgd", "momentum=0.0"), ("adagrad", None)])
def test_msam_refuses_an_optimizer_without_momentum(tmp_path, optim, optim_args):
    kw = dict(optim=optim, sam_variant="msam")
    if optim_args:
        kw["optim_args"] = optim_args
    with pytest.raises(ValueError, match="msam.*momentum"):
        tiny.trainer(tmp_path, model0(), **kw)


def test_msam_accepts_a_user_optimizer_with_momentum(tmp_path):
    model = model0()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    from hf_sam import SAMTrainer
    SAMTrainer(model=model, args=tiny.args(tmp_path, sam_variant="msam"), train_dataset=tiny.Blobs(),
               optimizers=(opt, None))
    bad = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="momentum=0"):
        SAMTrainer(model=model, args=tiny.args(tmp_path, sam_variant="msam"), train_dataset=tiny.Blobs(),
                   optimizers=(bad, None))


# ---- per-sample losses ---------------------------------------------------------------------------------------
class TinyForCausalLM(torch.nn.Module):
    pass


class TinyForTokenClassification(torch.nn.Module):
    pass


def test_per_sample_loss_classification_and_causal_lm():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, generator=g)
    labels = torch.randint(0, 3, (5,), generator=g)
    out = per_sample_loss({"logits": logits}, {"labels": labels}, tiny.MLP())
    assert torch.allclose(out, torch.stack([F.cross_entropy(logits[i:i + 1], labels[i:i + 1]) for i in range(5)]))

    lm_logits = torch.randn(2, 4, 7, generator=g)
    lm_labels = torch.tensor([[1, 2, 3, -100], [4, -100, -100, -100]])
    got = per_sample_loss({"logits": lm_logits}, {"labels": lm_labels}, TinyForCausalLM())
    first = F.cross_entropy(lm_logits[0, :2], lm_labels[0, 1:3])  # tokens 2, 3 predicted from positions 0, 1
    assert torch.allclose(got[0], first)
    assert got[1] == 0  # no counted token
    tok = per_sample_loss({"logits": lm_logits}, {"labels": lm_labels}, TinyForTokenClassification())
    assert torch.allclose(tok[1], F.cross_entropy(lm_logits[1, :1], lm_labels[1, :1]))


def test_per_sample_loss_refuses_unknown_tasks():
    with pytest.raises(ValueError, match="causal LM .* or a token classifier"):
        per_sample_loss({"logits": torch.randn(2, 4, 7)}, {"labels": torch.zeros(2, 4, dtype=torch.long)},
                        tiny.MLP())
    with pytest.raises(ValueError, match="need labels"):
        per_sample_loss({"logits": torch.randn(2, 3)}, {"x": torch.randn(2, 6)}, tiny.MLP())
    with pytest.raises(ValueError, match="no 'logits'"):
        per_sample_loss({"loss": torch.tensor(1.0)}, {"labels": torch.zeros(2, dtype=torch.long)}, tiny.MLP())
    with pytest.raises(ValueError, match="match no supported task"):
        per_sample_loss({"logits": torch.randn(2, 3, 4, 5)}, {"labels": torch.zeros(2, dtype=torch.long)},
                        tiny.MLP())


def test_esam_refuses_a_model_without_logits(tmp_path):
    class NoLogits(tiny.MLP):
        def forward(self, x, labels=None):
            return {"loss": super().forward(x, labels)["loss"]}

    with pytest.raises(ValueError, match="no 'logits'"):
        train(tmp_path, "esam", NoLogits(), steps=1, esam_beta=1.0)


def test_select_samples_keeps_non_batch_entries():
    batch = {"x": torch.arange(12.0).view(4, 3), "labels": torch.arange(4), "flag": True}
    sub = select_samples(batch, torch.tensor([1, 3]))
    assert sub["labels"].tolist() == [1, 3] and sub["x"][1, 0] == 9 and sub["flag"] is True


def test_report_deviations():
    """Prints the measured reference deviations (pytest -s); runs last in file order."""
    for key, value in sorted(DEVIATIONS.items()):
        print(f"{key:40s} {value:.2e}")
