"""muP^2 coordinate check: how strongly SAM perturbs each layer of a tiny GPT-2 as the width grows.

For GPT-2 models of several widths (same depth, same data), the script takes one gradient at
initialisation on a fixed batch, builds the SAM perturbation

    e_p = rho * s_p * g_p / (sqrt(sum_k (q_k * ||g_k||)^2) + eps)

with s = q = 1 (rho_scaling="none", plain SAM) or with the factors of
`hf_sam.scaling.layer_factors` (rho_scaling="mupp"), and measures for every layer its *effective
perturbation*: the RMS over tokens and features of the change of the layer's output caused by its
own weight perturbation, with the layer's own input x (for a linear layer: e_W x + e_b). A layer is
effectively perturbed when this stays Theta(1) as the width grows (Haas et al., NeurIPS 2024).

muP^2 presupposes a model in muP, so the main result uses a GPT-2 written in muP by hand
(hidden init variance 1/fan_in, readout init std ~ 1/width, attention scale 1/d_head, no
layer-index attention scaling). The standard parametrization (SP: init variance 1/fan_in for
every matrix including the readout, attention 1/sqrt(d_head)) is shown beside it, labelled SP:
muP^2's factors are derived for muP, not for SP.

    python scripts/mupp_coord_check.py                       # widths 64..512, table + PNG
    python scripts/mupp_coord_check.py --widths 32 64 128 --base-width 32 --no-plot

Nothing here is tuned to make the curves look flat: the slopes are printed as measured.
"""

import argparse
import math
import statistics
import time

import torch
from torch.func import functional_call
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from hf_sam.config import SAMConfig
from hf_sam.scaling import layer_factors, parameter_roles

PARAMETRIZATIONS = {
    "mup": "muP (hand-written: readout std ~1/width, attention 1/d_head)",
    "sp": "SP (standard parametrization: init var 1/fan_in everywhere, attention 1/sqrt(d_head))",
}
SCALINGS = ("none", "mupp")


# --- model ------------------------------------------------------------------------------------------------
def build_gpt2(width, args, parametrization, seed):
    """A GPT-2 LM of the given width, initialised in muP ("mup") or in the standard parametrization ("sp").

    Input-like tensors (embeddings) have std 1 at every width; hidden matrices std 1/sqrt(fan_in);
    the readout std 1/sqrt(fan_in) in SP and sqrt(base)/fan_in (variance ~ 1/fan_in^2) in muP, which
    equals SP at the base width. Biases 0, norm gains 1. Heads: a fixed number by default, so the head
    dimension grows with the width and muP's 1/d_head attention scale (equal to 1/sqrt(d_head) at the
    base width) matters; with --head-dim the head dimension is fixed and the number of heads grows.
    """
    hf_logging.set_verbosity_error()
    config = GPT2Config(n_embd=width, n_layer=args.layers, n_head=num_heads(width, args), vocab_size=args.vocab,
                        n_positions=args.seq_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=False,
                        bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    mult = width / args.base_width
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name:
                p.fill_(1.0)
            elif name.endswith(("wte.weight", "wpe.weight")):
                p.normal_(0.0, 1.0)
            elif name == "lm_head.weight":
                std = p.shape[1] ** -0.5
                p.normal_(0.0, std / math.sqrt(mult) if parametrization == "mup" else std)
            else:  # GPT-2 Conv1D stores (fan_in, fan_out)
                p.normal_(0.0, p.shape[0] ** -0.5)
    head_dim = width // num_heads(width, args)
    base_head_dim = args.base_width // num_heads(args.base_width, args)
    for module in model.modules():
        if hasattr(module, "scale_attn_weights"):  # GPT2Attention
            if not hasattr(module, "scaling"):
                raise RuntimeError("this transformers version's GPT2Attention has no `scaling` attribute to set")
            module.scaling = base_head_dim ** 0.5 / head_dim if parametrization == "mup" else head_dim ** -0.5
    return model


def num_heads(width, args):
    """--heads at every width, or width / --head-dim when the head dimension is held fixed."""
    return width // args.head_dim if args.head_dim else args.heads


def fixed_batch(args):
    """The same random token batch for every width."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen)


# --- perturbation -----------------------------------------------------------------------------------------
def sam_perturbation(named_grads, rho, factors, eps=1e-12):
    """e_p = rho * s_p * g_p / (sqrt(sum_k (q_k ||g_k||)^2) + eps), written out in plain torch."""
    s, q = factors if factors is not None else ([1.0] * len(named_grads), [1.0] * len(named_grads))
    norm = math.sqrt(sum((qk * g.double().norm().item()) ** 2 for qk, (_, g) in zip(q, named_grads)))
    return {n: rho * sk * g / (norm + eps) for sk, (n, g) in zip(s, named_grads)}


def rms(t):
    return t.double().pow(2).mean().sqrt().item()


def layer_effects(model, ids, e):
    """RMS of each leaf layer's output change caused by its own parameters' perturbation e."""
    modules = {name: m for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    captured = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: captured.__setitem__(name, (args, out)))
             for name, m in modules.items()]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    effects = {}
    with torch.no_grad():
        for name, (args, out) in captured.items():
            prefix = f"{name}." if name else ""
            params = {k: p + e[prefix + k] for k, p in modules[name].named_parameters(recurse=False)}
            delta = functional_call(modules[name], params, args) - out
            if name.endswith("attn.c_attn"):  # GPT-2's fused query/key/value projection: report each part
                for part, chunk in zip("qkv", delta.chunk(3, dim=-1)):
                    effects[f"{name}[{part}]"] = rms(chunk)
            else:
                effects[name] = rms(delta)
    return effects


def measure(width, args, parametrization, seed):
    """{scaling: per-layer effective perturbation} for one model, one gradient at init."""
    model = build_gpt2(width, args, parametrization, seed)
    ids = fixed_batch(args)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    grads = [(n, p.grad) for n, p in named]
    out = {}
    for scaling in SCALINGS:
        extra = {"mupp_base_width": args.base_width, "mupp_convention": "a0"} if scaling == "mupp" else {}
        factors = layer_factors(model, named, SAMConfig(rho=args.rho, rho_scaling=scaling, **extra))
        out[scaling] = layer_effects(model, ids, sam_perturbation(grads, args.rho, factors))
    return out


def layer_roles(args):
    """Role of each layer (from its weight) under the default muP^2 roles, for the table and the plot."""
    model = build_gpt2(args.base_width, args, "mup", 0)
    config = SAMConfig(rho_scaling="mupp", mupp_base_width=args.base_width)
    roles = {r.name: r.role for r in parameter_roles(model, list(model.named_parameters()), config)}
    out = {name: roles.get(f"{name}.weight", "?") for name, _ in model.named_modules() if f"{name}.weight" in roles}
    for name in [n for n in out if n.endswith("attn.c_attn")]:
        out.update({f"{name}[{part}]": out[name] for part in "qkv"})
    return out


def slope(widths, values):
    """Least-squares slope of log(value) against log(width)."""
    xs = [math.log(w) for w in widths]
    ys = [math.log(max(v, 1e-300)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def run_check(args):
    """{(parametrization, scaling): {"effects": {layer: [rms per width]}, "slopes": {layer: slope}}}."""
    results = {}
    for par in args.parametrizations:
        per_width = {scaling: [] for scaling in SCALINGS}
        for width in args.widths:
            runs = [measure(width, args, par, seed) for seed in range(args.seeds)]
            for scaling in SCALINGS:
                layers = runs[0][scaling]
                per_width[scaling].append({k: sum(r[scaling][k] for r in runs) / len(runs) for k in layers})
        for scaling in SCALINGS:
            effects = {k: [pw[k] for pw in per_width[scaling]] for k in per_width[scaling][0]}
            results[(par, scaling)] = {"effects": effects,
                                       "slopes": {k: slope(args.widths, v) for k, v in effects.items()}}
    return results


# --- output -----------------------------------------------------------------------------------------------
def format_table(results, args, roles):
    lines = []
    for (par, scaling), res in results.items():
        lines.append(f"\n{PARAMETRIZATIONS[par]}  |  rho_scaling={scaling}  (rho={args.rho}, base width "
                     f"{args.base_width}, {args.seeds} seed(s))")
        header = f"{'layer':32s} {'role':7s}" + "".join(f"{'n=' + str(w):>11s}" for w in args.widths) + f"{'slope':>9s}"
        lines.append(header)
        lines.append("-" * len(header))
        for layer, values in res["effects"].items():
            lines.append(f"{layer:32s} {roles.get(layer, '?'):7s}" + "".join(f"{v:11.3e}" for v in values)
                         + f"{res['slopes'][layer]:9.2f}")
    return "\n".join(lines)


def summary(results, roles, flat=0.3):
    """Per scheme: median |slope| of the non-readout layers, the layers that are not flat, the readout slope."""
    out = {}
    for key, res in results.items():
        inner = {k: s for k, s in res["slopes"].items() if roles.get(k) != "output"}
        readout = [s for k, s in res["slopes"].items() if roles.get(k) == "output"]
        out[key] = {"median_abs_slope_non_readout": statistics.median(abs(s) for s in inner.values()),
                    "not_flat": {k: s for k, s in inner.items() if abs(s) > flat},
                    "readout_slope": readout[0] if readout else float("nan")}
    return out


def plot(results, args, roles, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"input": "tab:blue", "hidden": "tab:green", "output": "tab:red", "fixed": "tab:gray", "?": "k"}
    titles = {"mup": "muP model", "sp": "SP model (standard parametrization, for contrast)"}
    pars = list(args.parametrizations)
    fig, axes = plt.subplots(len(pars), 2, figsize=(10, 4 * len(pars)), sharey=True, squeeze=False)
    for i, par in enumerate(pars):
        for j, scaling in enumerate(SCALINGS):
            ax = axes[i][j]
            for layer, values in results[(par, scaling)]["effects"].items():
                role = roles.get(layer, "?")
                style = "--" if layer.endswith(("[q]", "[k]")) else "-"
                ax.loglog(args.widths, values, style, marker="o", lw=1, color=colors[role], alpha=0.8)
            ax.set_title(f"{titles[par]}, rho_scaling={scaling}", fontsize=9)
            ax.set_xlabel("width (n_embd)")
            ax.minorticks_off()
            ax.set_xticks(args.widths, [str(w) for w in args.widths])
            if j == 0:
                ax.set_ylabel("RMS of layer output change from its own e")
    handles = [plt.Line2D([], [], color=c, marker="o", label=r) for r, c in colors.items() if r in roles.values()]
    handles.append(plt.Line2D([], [], color=colors["hidden"], ls="--", marker="o", label="hidden: query/key part"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), title="layer role (default muP^2 roles)")
    fig.suptitle(f"muP^2 coordinate check: tiny GPT-2, one gradient at init, rho={args.rho}, base width "
                 f"{args.base_width}, mean of {args.seeds} seed(s)", fontsize=9, y=0.005, va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 0.93))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512], help="model widths (n_embd)")
    parser.add_argument("--base-width", type=int, default=64, help="mupp_base_width: where muP^2 equals plain SAM")
    parser.add_argument("--parametrizations", nargs="+", choices=sorted(PARAMETRIZATIONS), default=["mup", "sp"],
                        help="model parametrizations to show (muP is the one muP^2 is derived for)")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4, help="attention heads (fixed: head dim grows with width)")
    parser.add_argument("--head-dim", type=int, default=None,
                        help="hold the head dimension fixed instead (more heads at larger width)")
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2, help="initialisations averaged per width")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads while measuring")
    parser.add_argument("--out", default="mupp_coord_check.png", help="PNG path for the log-log plot")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    divisor = args.head_dim or args.heads
    if any(w % divisor for w in args.widths + [args.base_width]):
        parser.error(f"every width and the base width must be divisible by {divisor} (--heads or --head-dim)")
    return args


def main(argv=None):
    """Run the check, print the table and slopes, write the plot; returns the results and summary."""
    args = parse_args(argv)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # tiny matrices: extra threads only contend
    try:
        roles = layer_roles(args)
        results = run_check(args)
    finally:
        torch.set_num_threads(threads)
    print(format_table(results, args, roles))
    stats = summary(results, roles)
    print("\nlog-log slopes of the effective perturbation against width:")
    for (par, scaling), st in stats.items():
        not_flat = ", ".join(f"{k} {v:+.2f}" for k, v in st["not_flat"].items()) or "none"
        print(f"  {par:3s} rho_scaling={scaling:5s} median |slope| (non-readout) {st['median_abs_slope_non_readout']:.2f}; "
              f"readout {st['readout_slope']:+.2f}; non-readout layers with |slope| > 0.3: {not_flat}")
    if not args.no_plot:
        plot(results, args, roles, args.out)
        print(f"\nplot written to {args.out}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return {"results": results, "summary": stats, "roles": roles}


if __name__ == "__main__":
    main()
