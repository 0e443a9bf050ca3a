"""Flat-LoRA: random weight perturbation of the merged weight of every LoRA layer, in one pass.

Paper: Tao Li, Zhengbao He, Yujun Li, Yasheng Wang, Lifeng Shang, Xiaolin Huang. "Flat-LoRA:
Low-Rank Adaptation over a Flat Loss Landscape", ICML 2025, arXiv 2409.14396. Code:
nblt/Flat-LoRA, logTrainer.py (`FlatLoraTrainer.training_step`).

The objective is the expected loss under random perturbations of the full merged weight,
min_{A,B} E_eps L(W0 + s B A + eps). For every LoRA Linear layer with merged weight
W' = W0 + s B A (d_out x d_in, every active adapter), per output row r:
    sigma_r  = gamma_t * rho * ||W'_r||_2 / sqrt(d_in)
    eps_rj   ~ N(0, sigma_r^2)
    gamma_t  = (1 - cos(pi t / T)) / 2     (flat_lora_ramp='cosine'; 1 for 'constant')
with t the optimizer step and T = max_steps; one pass at W' + eps gives the descent gradient of
the adapter parameters. Nothing else is perturbed and there is no ascent.

Semantics chosen (differences from the official code, by design):
- Randomness: the official trainer reseeds from the wall clock. Here the noise of layer l in a
  micro-batch comes from a torch.Generator seeded with `layer_seed(seed, global_step, micro_step,
  l)`: reproducible, the same on every process (rank is not in the seed), and a resumed run draws
  what an uninterrupted one draws. A new draw per micro-batch (the official code keeps one draw
  for a whole accumulation window), in fp32, cast to the layer's dtype.
- Exact removal: the official code adds eps to the frozen base weight in place and subtracts the
  regenerated eps afterwards (not bit-exact in floating point). Here no weight is touched: a
  forward hook adds x @ eps^T to the layer's output (= x @ (W' + eps)^T), through an autograd
  function that keeps only the seed and sigma and regenerates eps for the backward. The weights
  after the step are bit-identical by construction; the price is one extra matmul per LoRA layer
  in the forward and one in the backward, and two draws of eps per layer and pass.
- T is `max_steps` (optimizer steps); the official T counts batches per device.
LoRA layers are PEFT `lora.Linear` modules over an nn.Linear (fan_in_fan_out=False, no DoRA);
a model without any is refused before training, as are merged adapters.

Defaults: rho 0.05 (the official README: Llama-2, MetaMathQA, rank 8), cosine ramp. rho = 0 is
the stock step. Cost: 1 pass (+1 matmul per LoRA layer forward and backward); memory: one d_out
vector per layer and the transient noise of one layer at a time. hf_sam.SAM is not supported
(the check of the model runs in SAMTrainer's set-up).
"""

import hashlib
import math

import torch
import torch.nn.functional as F

from .common import micro_step
from .registry import Facts, register

FLAT_LORA_PAPER = {
    "title": "Flat-LoRA: Low-Rank Adaptation over a Flat Loss Landscape",
    "authors": "Tao Li, Zhengbao He, Yujun Li, Yasheng Wang, Lifeng Shang, Xiaolin Huang",
    "venue": "ICML 2025",
    "arxiv": "2409.14396",
    "bibtex": """@inproceedings{li2025flatlora,
  title={Flat-{LoRA}: Low-Rank Adaptation over a Flat Loss Landscape},
  author={Li, Tao and He, Zhengbao and Li, Yujun and Wang, Yasheng and Shang, Lifeng and Huang, Xiaolin},
  booktitle={Proceedings of the 42nd International Conference on Machine Learning},
  year={2025},
  url={https://arxiv.org/abs/2409.14396}
}""",
}


def layer_seed(seed: int, step: int, micro: int, layer: int) -> int:
    """Seed of layer `layer`'s noise: sha256("hf_sam:flat_lora:{seed}:{step}:{micro}:{layer}"), 8 bytes LE, >> 1."""
    digest = hashlib.sha256(f"hf_sam:flat_lora:{seed}:{step}:{micro}:{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def lora_layers(model) -> list:
    """The PEFT LoRA Linear layers of `model` (in named_modules order); ValueError when there are none."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        raise ValueError("variant='flat_lora' perturbs the merged weights of PEFT LoRA layers; install peft and "
                         "wrap the model with peft.get_peft_model.") from None
    layers = [m for _, m in model.named_modules() if isinstance(m, LoraLinear)] if model is not None else []
    if not layers:
        raise ValueError(f"variant='flat_lora' needs a PEFT LoRA model; {type(model).__name__} has no LoRA Linear "
                         "layers (wrap it with peft.get_peft_model(model, LoraConfig(target_modules=...))).")
    for m in layers:
        if m.merged:
            raise ValueError("variant='flat_lora': the LoRA adapters are merged into the base weights; unmerge them.")
        if not isinstance(m.get_base_layer(), torch.nn.Linear) or m.fan_in_fan_out:
            raise ValueError("variant='flat_lora' supports LoRA on nn.Linear layers (fan_in_fan_out=False).")
        if any(m.use_dora.get(a, False) for a in m.active_adapters):
            raise ValueError("variant='flat_lora' does not support DoRA adapters (use_dora=True).")
    return layers


def merged_weight(layer) -> torch.Tensor:
    """W' = W0 + sum over the active adapters of s B A, in fp32."""
    w = layer.get_base_layer().weight.detach().float()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            w = w + layer.get_delta_weight(adapter).detach().float()
    return w


def draw(shape, sigma, seed, device, dtype) -> torch.Tensor:
    """eps = sigma_r * N(0, 1), drawn in fp32 from a generator seeded with `seed`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    z = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    return z.mul_(sigma[:, None]).to(dtype)


class _NoiseLinear(torch.autograd.Function):
    """y = x @ eps^T with eps regenerated from its seed in the backward (nothing parameter-sized is saved)."""

    @staticmethod
    def forward(ctx, x, sigma, seed, d_in):
        ctx.save_for_backward(sigma)
        ctx.seed, ctx.d_in = seed, d_in
        return F.linear(x, draw((sigma.numel(), d_in), sigma, seed, x.device, x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        (sigma,) = ctx.saved_tensors
        eps = draw((sigma.numel(), ctx.d_in), sigma, ctx.seed, grad_out.device, grad_out.dtype)
        return grad_out @ eps, None, None, None


def ramp(ctx) -> float:
    if ctx.config.flat_lora_ramp == "constant":
        return 1.0
    if not ctx.max_steps:
        raise ValueError("variant='flat_lora' with flat_lora_ramp='cosine' needs max_steps (T of the ramp).")
    return 0.5 * (1.0 - math.cos(math.pi * ctx.global_step / ctx.max_steps))


def flat_lora(ctx):
    layers = ctx.selection.cache.get("flat_lora")
    if layers is None:
        layers = ctx.selection.cache["flat_lora"] = lora_layers(ctx.model)
    gamma = ramp(ctx) * float(ctx.config.rho)
    if gamma == 0:
        ctx.grad(final=True)                                   # gamma_0 = 0: the stock pass
        return
    step, micro = ctx.global_step, micro_step(ctx)
    handles = []
    try:
        for index, layer in enumerate(layers):
            with torch.no_grad():
                w = merged_weight(layer)
                sigma = w.norm(dim=1).mul_(gamma / math.sqrt(w.shape[1]))   # one d_out vector
            del w
            seed = layer_seed(ctx.seed, step, micro, index)

            def hook(module, args, output, sigma=sigma, seed=seed):    # output + x @ eps^T
                return output + _NoiseLinear.apply(args[0], sigma, seed, module.get_base_layer().in_features)
            handles.append(layer.register_forward_hook(hook))
        ctx.grad(final=True)                                   # the one pass, at W' + eps
    finally:
        for h in handles:
            h.remove()


def on_setup(trainer) -> None:
    lora_layers(trainer.model)                                 # refuse a model without LoRA layers, before training


def _check(config):
    if config.adaptive or config.rho_scaling != "none":
        raise ValueError("variant='flat_lora' draws random noise and has no gradient ascent: remove adaptive=True and "
                         "use rho_scaling='none'.")
    if config.perturb != "trainable" or config.perturb_include or config.perturb_exclude:
        raise ValueError("variant='flat_lora' perturbs the merged weight of every LoRA layer (not the trainable "
                         "parameters): leave perturb, perturb_include and perturb_exclude at their defaults.")


FLAT_LORA_FACTS = Facts(
    paper='Li et al., *Flat-LoRA: Low-Rank Adaptation over a Flat Loss Landscape*, ICML 2025, '
          '[2409.14396](https://arxiv.org/abs/2409.14396)',
    settings='`rho` (0.05: noise scale), `flat_lora_ramp` (cosine | constant); PEFT LoRA models only',
    passes='1 (+1 matmul per LoRA layer, forward and backward)',
    memory='none parameter-sized: one d_out vector per LoRA layer, the noise of one layer at a time',
)

register("flat_lora", facts=FLAT_LORA_FACTS, passes=1, paper=FLAT_LORA_PAPER, check=_check, on_setup=on_setup)(flat_lora)
