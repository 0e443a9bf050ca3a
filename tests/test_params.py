"""Parameter selection: perturb = trainable | lora | norm, and include/exclude patterns.

Expected selections are written from parameter names (an independent reference to the type- and
PEFT-based selection in hf_sam.params). Tiny models are built from configs; nothing is downloaded.
"""

import re
import warnings

import pytest
import torch
from torch import nn
from transformers.utils import logging as hf_logging

from hf_sam import params as params_module
from hf_sam.config import SAMConfig
from hf_sam.params import select_parameters

peft = pytest.importorskip("peft")
from peft import AdaLoraConfig, LoraConfig, get_peft_model  # noqa: E402

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=UserWarning, module="peft")


from tiny import bert, gpt2, llama, vit  # noqa: E402

# --- tiny models ------------------------------------------------------------------------------------------


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def select(model, **cfg):
    return select_parameters(model, trainable(model), SAMConfig(**cfg))


# --- trainable + patterns ---------------------------------------------------------------------------------
def test_trainable_is_every_trainable_parameter_in_order():
    model = gpt2()
    model.transformer.wpe.weight.requires_grad_(False)
    expected = [n for n, p in model.named_parameters() if n != "transformer.wpe.weight"]
    assert select(model) == expected


def test_trainable_skips_parameters_without_requires_grad_even_if_passed():
    model = gpt2()
    model.lm_head.weight.requires_grad_(False)
    chosen = select_parameters(model, list(model.named_parameters()), SAMConfig())
    assert "lm_head.weight" not in chosen and len(chosen) == len(list(model.parameters())) - 1


def test_include_then_exclude_patterns():
    model = gpt2()
    names = [n for n, _ in model.named_parameters()]
    assert select(model, perturb_include=[r"\.attn\."]) == [n for n in names if ".attn." in n]
    assert select(model, perturb_exclude=[r"bias$", r"^lm_head"]) == [
        n for n in names if not n.endswith("bias") and not n.startswith("lm_head")]
    both = select(model, perturb_include=[r"\.mlp\.", r"wte"], perturb_exclude=[r"\.h\.1\."])
    assert both == [n for n in names if (".mlp." in n or "wte" in n) and ".h.1." not in n]


def test_single_string_pattern_is_accepted():
    model = gpt2()
    assert select(model, perturb_include="lm_head") == ["lm_head.weight"]


def test_patterns_that_leave_nothing_raise_naming_mode_and_model():
    with pytest.raises(ValueError, match=r"perturb='trainable'.*perturb_include.*GPT2LMHeadModel"):
        select(gpt2(), perturb_include=[r"no_such_parameter"])


def test_invalid_regex_names_the_setting():
    with pytest.raises(ValueError, match="perturb_exclude"):
        select(gpt2(), perturb_exclude=["(unclosed"])


# --- norm -------------------------------------------------------------------------------------------------
NORM_NAMES = {  # reference by name for each family
    "gpt2": lambda n: re.search(r"(\.ln_\d\.|\.ln_f\.)", n),
    "llama": lambda n: re.search(r"(layernorm|^model\.norm)\.", n),
    "bert": lambda n: "LayerNorm." in n,
    "vit": lambda n: re.search(r"(layernorm_before|layernorm_after|^vit\.layernorm)\.", n),
}


@pytest.mark.parametrize("family,build", [("gpt2", gpt2), ("llama", llama), ("bert", bert), ("vit", vit)])
def test_norm_selects_the_normalisation_layers(family, build):
    model = build()
    expected = [n for n, _ in model.named_parameters() if NORM_NAMES[family](n)]
    assert expected, "reference found no norm parameter"
    assert select(model, perturb="norm") == expected


class ConvNet(nn.Module):
    """BatchNorm, GroupNorm and a home-made RMSNorm recognised by its class name."""

    class MyRMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 8)
        self.rms = self.MyRMSNorm(8)
        self.head = nn.Linear(8, 2)


def test_norm_recognises_batchnorm_groupnorm_and_custom_norm_classes():
    assert select(ConvNet(), perturb="norm") == ["bn.weight", "bn.bias", "gn.weight", "gn.bias", "rms.gain"]


def test_norm_with_frozen_norms_raises_naming_mode_and_model():
    model = ConvNet()
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(("bn", "gn", "rms")))
    with pytest.raises(ValueError, match=r"perturb='norm'.*ConvNet"):
        select(model, perturb="norm")


def test_norm_then_include_pattern():
    assert select(llama(), perturb="norm", perturb_include=[r"^model\.layers\.0\."]) == [
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"]


# --- lora -------------------------------------------------------------------------------------------------
def lora_gpt2(**lora):
    return get_peft_model(gpt2(), LoraConfig(r=4, target_modules=["c_attn"], **lora))


def names_matching(model, pattern):
    return [n for n, p in model.named_parameters() if p.requires_grad and re.search(pattern, n)]


def test_lora_selects_the_adapter_factors():
    model = lora_gpt2()
    chosen = select(model, perturb="lora")
    assert chosen == names_matching(model, r"\.lora_[AB]\.default\.weight$")
    assert len(chosen) == 4


def test_lora_on_embeddings_and_linear_layers():
    model = get_peft_model(gpt2(), LoraConfig(r=4, target_modules=["c_attn", "wte"]))
    chosen = select(model, perturb="lora")
    assert chosen == names_matching(model, r"\.lora_(A|B|embedding_A|embedding_B)\.default")
    assert any("lora_embedding_A" in n for n in chosen)


def test_dora_includes_the_magnitude_vector():
    model = lora_gpt2(use_dora=True)
    chosen = select(model, perturb="lora")
    assert chosen == names_matching(model, r"\.lora_(A|B|magnitude_vector)\.default")
    assert sum("lora_magnitude_vector" in n for n in chosen) == 2


def test_adalora_includes_the_singular_values():
    model = get_peft_model(gpt2(), AdaLoraConfig(init_r=4, target_r=2, target_modules=["c_attn"], total_step=10))
    chosen = select(model, perturb="lora")
    assert chosen == names_matching(model, r"\.lora_(A|B|E)\.default$")
    assert sum(".lora_E." in n for n in chosen) == 2


def test_modules_to_save_head_is_trained_but_only_perturbed_on_request():
    model = lora_gpt2(modules_to_save=["lm_head"])
    head = names_matching(model, r"lm_head\.modules_to_save\.default\.weight$")
    assert head, "the head copy must be trainable (the optimizer updates it)"
    lora = names_matching(model, r"\.lora_[AB]\.")
    assert select(model, perturb="lora") == lora
    assert select(model, perturb="lora", lora_modules_to_save=True) == names_matching(
        model, r"(\.lora_[AB]\.|lm_head\.modules_to_save\.)")


def test_sequence_classification_head_is_not_perturbed_by_default():
    model = get_peft_model(bert(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    head = names_matching(model, r"classifier\.modules_to_save")
    assert len(head) == 2  # weight and bias are trained
    chosen = select(model, perturb="lora")
    assert not set(head) & set(chosen)
    assert set(head) <= set(select(model, perturb="lora", lora_modules_to_save=True))


def test_only_active_adapters_are_selected():
    model = lora_gpt2()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["c_attn"]))
    for name, p in model.named_parameters():  # make the inactive adapter trainable too
        if ".other." in name:
            p.requires_grad_(True)
    chosen = select(model, perturb="lora")
    assert chosen and all(".default." in n for n in chosen)
    model.set_adapter("other")
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.requires_grad_(True)
    chosen = select(model, perturb="lora")
    assert chosen and all(".other." in n for n in chosen)


def test_lora_patterns_apply_after_the_mode():
    model = lora_gpt2()
    assert select(model, perturb="lora", perturb_exclude=[r"lora_A"]) == names_matching(model, r"\.lora_B\.")


def test_lora_without_adapters_raises_naming_mode_and_model():
    with pytest.raises(ValueError, match=r"perturb='lora'.*GPT2LMHeadModel"):
        select(gpt2(), perturb="lora")


def test_lora_with_disabled_adapters_raises():
    model = lora_gpt2()
    with model.disable_adapter():
        with pytest.raises(ValueError, match=r"perturb='lora'.*active adapter"):
            select(model, perturb="lora")


def test_lora_with_merged_adapters_raises_and_works_again_after_unmerge():
    model = lora_gpt2()
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"perturb='lora'.*GPT2LMHeadModel.*merged"):
        select(model, perturb="lora")
    model.unmerge_adapter()
    assert select(model, perturb="lora") == names_matching(model, r"\.lora_[AB]\.")


def test_lora_with_frozen_adapters_raises_nothing_to_perturb():
    model = lora_gpt2()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"perturb='lora' leaves no parameter of PeftModel.*GPT2LMHeadModel"):
        select(model, perturb="lora")


def test_trainable_tokens_are_not_adapter_factors():
    model = lora_gpt2(trainable_token_indices={"wte": [1, 2]})
    tokens = names_matching(model, r"trainable_tokens_delta")
    assert tokens, "PEFT should have made the token rows trainable"
    chosen = select(model, perturb="lora")
    assert chosen == names_matching(model, r"\.lora_[AB]\.")


def test_name_fallback_without_peft_matches_the_peft_selection(monkeypatch):
    model = get_peft_model(gpt2(), LoraConfig(r=4, target_modules=["c_attn", "wte"], use_dora=True,
                                              modules_to_save=["lm_head"]))
    with_peft = select(model, perturb="lora")
    with_peft_head = select(model, perturb="lora", lora_modules_to_save=True)
    monkeypatch.setattr(params_module, "_peft_classes", lambda: None)
    assert select(model, perturb="lora") == with_peft
    assert select(model, perturb="lora", lora_modules_to_save=True) == with_peft_head
    with pytest.raises(ValueError, match=r"perturb='lora'.*GPT2LMHeadModel"):
        select(gpt2(), perturb="lora")
