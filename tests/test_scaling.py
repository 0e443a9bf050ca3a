"""muP^2 layer factors (rho_scaling="mupp").

References are written here from the rule (roles from parameter names, factors from the table in
hf_sam/scaling.py's docstring and reference/algorithms.md section 22), not from the code under test.
"""

import math
import re
import types
import warnings

import pytest
import torch
from torch import nn
from transformers.utils import logging as hf_logging

from hf_sam.config import SAMConfig
from hf_sam.scaling import layer_factors, parameter_roles

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=UserWarning, module="peft")


from tiny import bert, gpt2, llama, vit  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one CPU thread avoids thread contention on busy machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mupp(base, **kw):
    return SAMConfig(rho_scaling="mupp", mupp_base_width=base, **kw)


def named(model):
    return list(model.named_parameters())


def gpt2_grads(model):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return [(n, p.grad.detach().clone()) for n, p in model.named_parameters()]


def perturbation(grads, rho, s=None, q=None, eps=1e-12):
    """Reference SAM perturbation: rho * s_p g_p / (|| concat(q_k g_k) || + eps), in float64."""
    s = s or [1.0] * len(grads)
    q = q or [1.0] * len(grads)
    weighted = torch.cat([(qk * g.double()).flatten() for qk, (_, g) in zip(q, grads)])
    denom = torch.linalg.vector_norm(weighted) + eps
    return {n: rho * sk * g.double() / denom for sk, (n, g) in zip(s, grads)}


# --- references written from the rule ---------------------------------------------------------------------
FACTORS_A0 = {  # role -> (s, q) as functions of m, decoupled denominator
    "input": (lambda m: m, lambda m: m ** 0.5),
    "hidden": (lambda m: 1.0, lambda m: 1.0),
    "output": (lambda m: 1 / m, lambda m: m ** -0.5),
    "fixed": (lambda m: 1.0, lambda m: 1.0),
}


def gpt2_role(name):
    if name == "lm_head.weight":
        return "output"
    if re.search(r"(wte|wpe|\.ln_\d|ln_f)\.", name) or name.endswith(".bias"):
        return "input"
    return "hidden"


def llama_role(name):
    if name == "lm_head.weight":
        return "output"
    if "embed_tokens" in name or re.search(r"(layernorm|^model\.norm)\.", name):
        return "input"
    return "hidden"


def bert_role(name):
    if name == "classifier.weight":
        return "output"
    if name == "classifier.bias":
        return "fixed"
    if name.startswith("bert.embeddings.") or "LayerNorm" in name or name.endswith(".bias"):
        return "input"
    return "hidden"


def vit_role(name):
    if name == "classifier.weight":
        return "output"
    if name == "classifier.bias":
        return "fixed"
    if name.startswith("vit.embeddings.") or "layernorm" in name or name.endswith(".bias"):
        return "input"
    return "hidden"


# --- tests --------------------------------------------------------------------------------------------------
def test_none_returns_none():
    model = gpt2()
    assert layer_factors(model, named(model), SAMConfig()) is None


@pytest.mark.parametrize("extra", [{}, {"mupp_convention": "mup"}, {"mupp_denominator": "joint"}])
def test_m_equal_one_is_exactly_plain_sam(extra):
    model = gpt2(width=32)
    grads = gpt2_grads(model)
    s, q = layer_factors(model, named(model), mupp(32, **extra))
    assert s == [1.0] * len(grads) and q == [1.0] * len(grads)
    plain, scaled = perturbation(grads, 0.05), perturbation(grads, 0.05, s, q)
    assert all(torch.equal(plain[n], scaled[n]) for n in plain)


def test_m_two_matches_a_reference_written_from_the_rule():
    model = gpt2(width=32)
    grads = gpt2_grads(model)
    s, q = layer_factors(model, named(model), mupp(16))
    roles = [gpt2_role(n) for n, _ in grads]
    s_ref = [FACTORS_A0[r][0](2.0) for r in roles]
    q_ref = [FACTORS_A0[r][1](2.0) for r in roles]
    assert s == pytest.approx(s_ref, rel=1e-12) and q == pytest.approx(q_ref, rel=1e-12)
    # the perturbation itself, both ways, and a few literal values of the rule
    got, ref = perturbation(grads, 0.05, s, q), perturbation(grads, 0.05, s_ref, q_ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-12)
    factors = dict(zip([n for n, _ in grads], zip(s, q)))
    assert factors["transformer.wte.weight"] == pytest.approx((2.0, math.sqrt(2.0)))
    assert factors["transformer.h.0.mlp.c_fc.weight"] == (1.0, 1.0)
    assert factors["lm_head.weight"] == pytest.approx((0.5, 1 / math.sqrt(2.0)))
    # and the perturbation differs from plain SAM: the rule does something at m = 2
    plain = perturbation(grads, 0.05)
    assert not torch.allclose(got["transformer.wte.weight"], plain["transformer.wte.weight"])


def test_joint_denominator_uses_the_numerator_factors():
    model = gpt2(width=64)
    s, q = layer_factors(model, named(model), mupp(16, mupp_denominator="joint"))
    assert q == s
    assert s[[n for n, _ in named(model)].index("lm_head.weight")] == pytest.approx(0.25)


def test_mup_convention_scales_the_readout_like_an_input():
    model = gpt2(width=64)
    names = [n for n, _ in named(model)]
    s, q = layer_factors(model, named(model), mupp(16, mupp_convention="mup"))
    i = names.index("lm_head.weight")
    assert (s[i], q[i]) == pytest.approx((4.0, 2.0))


@pytest.mark.parametrize("build,reference", [(gpt2, gpt2_role), (llama, llama_role), (bert, bert_role), (vit, vit_role)])
def test_default_roles_for_model_families(build, reference):
    model = build()
    roles = parameter_roles(model, named(model), mupp(16))
    got = {r.name: r.role for r in roles}
    expected = {n: reference(n) for n, _ in named(model)}
    assert got == expected
    assert all(r.m == 2.0 for r in roles)
    assert set(got.values()) >= {"input", "hidden", "output"}


def test_layer_factors_follow_the_roles_on_vit():
    model = vit()
    s, q = layer_factors(model, named(model), mupp(8))  # m = 4
    for (name, _), sp, qp in zip(named(model), s, q):
        fs, fq = FACTORS_A0[vit_role(name)]
        assert (sp, qp) == pytest.approx((fs(4.0), fq(4.0))), name


def test_tied_embeddings_are_an_error_under_a0_that_explains_the_choices():
    model = gpt2(tie=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(ValueError) as err:
        layer_factors(model, named(model), mupp(16))
    msg = str(err.value)
    assert "transformer.wte.weight" in msg and "tie_word_embeddings=False" in msg
    assert "mupp_convention='mup'" in msg and "mupp_roles" in msg


def test_tied_embeddings_work_under_mup_convention_or_with_an_explicit_role():
    model = gpt2(tie=True)
    names = [n for n, _ in named(model)]
    i = names.index("transformer.wte.weight")
    s, _ = layer_factors(model, named(model), mupp(16, mupp_convention="mup"))
    assert s[i] == 2.0
    s, _ = layer_factors(model, named(model), mupp(16, mupp_roles={r"\.wte\.": "fixed"}))
    assert s[i] == 1.0


def test_mupp_roles_come_before_the_defaults_and_unmatched_patterns_are_fine():
    model = gpt2(width=64)
    roles = {r.name: r for r in parameter_roles(
        model, named(model), mupp(16, mupp_roles={r"^lm_head": "hidden", r"\.ln_f\.": "fixed", "nothing_here": "input"}))}
    assert roles["lm_head.weight"].role == "hidden" and "mupp_roles" in roles["lm_head.weight"].reason
    assert roles["transformer.ln_f.weight"].role == "fixed"
    assert roles["transformer.wte.weight"].role == "input"


def test_mupp_roles_bad_regex_and_bad_role_are_rejected():
    model = gpt2()
    with pytest.raises(ValueError, match="mupp_roles"):
        layer_factors(model, named(model), mupp(16, mupp_roles={"(": "input"}))
    with pytest.raises(ValueError, match="mupp_roles"):
        mupp(16, mupp_roles={"wte": "embedding"})  # the config rejects unknown role names


def test_width_from_config_keys_and_from_mupp_width():
    model = gpt2(width=32)
    assert parameter_roles(model, named(model), mupp(16, mupp_width=64))[0].m == 4.0
    assert parameter_roles(llama(), named(llama()), mupp(8))[0].m == 4.0  # hidden_size
    seq = nn.Sequential(nn.Linear(4, 48), nn.Linear(48, 2))
    seq.config = types.SimpleNamespace(d_model=48)
    assert parameter_roles(seq, named(seq), mupp(16))[0].m == 3.0


def test_unreadable_width_names_the_setting():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"Sequential.*mupp_width"):
        layer_factors(model, named(model), mupp(4))
    s, q = layer_factors(model, named(model), mupp(4, mupp_width=8))
    assert len(s) == len(q) == 4


def test_peft_model_with_saved_head_keeps_the_readout_role():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(gpt2(width=32), peft.LoraConfig(r=4, target_modules=["c_attn", "wte"],
                                                                 modules_to_save=["lm_head"]))
    roles = {r.name: r.role for r in parameter_roles(model, named(model), mupp(16))}
    prefix = "base_model.model."
    assert roles[prefix + "lm_head.modules_to_save.default.weight"] == "output"
    assert roles[prefix + "lm_head.original_module.weight"] == "output"
    assert roles[prefix + "transformer.wte.base_layer.weight"] == "input"
    assert roles[prefix + "transformer.h.0.attn.c_proj.weight"] == "hidden"
    # adapter factors are matrices: hidden by default, also on the embedding
    assert roles[prefix + "transformer.h.0.attn.c_attn.lora_A.default.weight"] == "hidden"
    assert roles[prefix + "transformer.wte.lora_embedding_A.default"] == "hidden"


def test_factors_are_aligned_with_a_subset_of_parameters():
    model = gpt2(width=32)
    subset = [(n, p) for n, p in named(model) if n in ("lm_head.weight", "transformer.wte.weight")]
    s, q = layer_factors(model, subset, mupp(16))
    assert s == pytest.approx([2.0, 0.5]) and q == pytest.approx([math.sqrt(2), 1 / math.sqrt(2)])


def test_mup_package_infshape_gives_roles_and_multipliers():
    mup = pytest.importorskip("mup")

    class MLP(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.inp = nn.Linear(8, width)
            self.hid = nn.Linear(width, width)
            self.out = mup.MuReadout(width, 3)

    model = MLP(64)
    mup.set_base_shapes(model, MLP(16), delta=MLP(32))
    s, q = layer_factors(model, named(model), mupp(16))  # auto -> infshape; m = 4 from the base shapes
    expected = {"inp.weight": (4, 2), "inp.bias": (4, 2), "hid.weight": (1, 1), "hid.bias": (4, 2),
                "out.weight": (4, 2), "out.bias": (1, 1)}
    assert dict(zip([n for n, _ in named(model)], zip(s, q))) == pytest.approx(expected)
