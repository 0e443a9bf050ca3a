"""lm: does SAM pay for itself when pretraining a small GPT-2? (Singh et al., ICML 2025, on our data)

The project's pydoc job (scripts/train_lm.py, configs/gpt_pydoc.yaml: byte-level BPE 1024 tokens,
128-token blocks, AdamW lr 2e-3 cosine, wd 0.1, batch 16, dropout 0.1), made smaller to fit a shared
2-core CPU: width 64, 2 layers, 4 heads, 2 epochs (148 optimizer steps) instead of width 128,
4 layers, 6 epochs. Held-out perplexity on the 10% of documents the split keeps aside.

Configurations: AdamW at equal steps, AdamW at twice the steps (equal compute with the two-pass
variants), sam, psam, functional_sam (raw ascent; the Adam-preconditioned ascent is the "extra" part)
at rho 0.05, and one cheap variant (looksam, k = 5, the label_noise study's best cheap variant). Cost:
forward+backward passes x steps relative to AdamW; the Trainer's wall time is shown too, but on a
shared machine it measures the neighbours as much as the run.
Note the regime differs from the paper's single-pass C4 pretraining: 2 passes over a tiny corpus.
"""

from studies._report import fmt, mean_sd, status_note, table
from studies._subprocess import run_script

SEEDS = 3
PARTS = ("headline", "extra")
MODEL = ["--n_embd", "64", "--n_layer", "2", "--n_head", "4"]
EPOCHS = 2
# passes: forward+backward passes per optimizer step (the variants table; looksam: 2 every 5th step)
CONFIGS = {
    "adamw": dict(sam=["--sam_rho", "0"], epochs=EPOCHS, passes=1),
    "adamw_2x_steps": dict(sam=["--sam_rho", "0"], epochs=2 * EPOCHS, passes=1),
    "sam": dict(sam=["--sam_variant", "sam", "--sam_rho", "0.05"], epochs=EPOCHS, passes=2),
    "psam": dict(sam=["--sam_variant", "psam", "--sam_rho", "0.05"], epochs=EPOCHS, passes=2),
    "functional_sam": dict(sam=["--sam_variant", "functional_sam", "--sam_rho", "0.05"], epochs=EPOCHS, passes=2),
    "functional_sam_adam": dict(sam=["--sam_variant", "functional_sam", "--sam_rho", "0.05",
                                     "--sam_functional_sam_ascent", "adam"], epochs=EPOCHS, passes=2),
    "looksam": dict(sam=["--sam_variant", "looksam", "--sam_rho", "0.05"], epochs=EPOCHS, passes=1.2),
}
EXTRA = {"functional_sam_adam": "extra"}  # run after the headline part when the budget allows
QUICK = ["--n_embd", "32", "--n_layer", "1", "--n_head", "2", "--block_size", "32", "--vocab_size", "300",
         "--max_steps", "3", "--per_device_eval_batch_size", "16", "--max_eval_samples", "8"]


def runs(parts, seeds, quick, cache):
    if quick:
        return [dict(id=f"quick_functional_sam_s{s}", part="headline", label="functional_sam", seed=s,
                     params=dict(flags=QUICK + CONFIGS["functional_sam"]["sam"])) for s in seeds]
    return [dict(id=f"{label}_s{s}", part=EXTRA.get(label, "headline"), label=label, seed=s,
                 params=dict(flags=MODEL + c["sam"] + ["--num_train_epochs", str(c["epochs"])]))
            for label, c in CONFIGS.items() for s in seeds if EXTRA.get(label, "headline") in parts]


def execute(run, quick):
    flags = ["--config", "configs/gpt_pydoc.yaml", *run["params"]["flags"], "--seed", str(run["seed"]),
             "--eval_strategy", "no", "--logging_strategy", "no", "--torch_threads", "1"]
    results, state, wall = run_script("train_lm.py", flags)
    return {"eval_perplexity": float(results["eval_perplexity"]), "eval_loss": float(results["eval_loss"]),
            "train_loss": float(results["train_loss"]), "steps": int(state["global_step"]),
            "train_runtime_s": float(results["train_runtime"]), "process_wall_s": wall}


def report(records, status, png, quick):
    got = {}
    for rec in records:
        got.setdefault(rec["label"], {})[rec["seed"]] = rec["result"]
    base = got.get("adamw", {})
    rows, summary = [], []
    for label in CONFIGS if not quick else got:
        per_seed = got.get(label, {})
        if not per_seed:
            continue
        seeds = sorted(per_seed)
        ppl = mean_sd([per_seed[s]["eval_perplexity"] for s in seeds])
        loss = mean_sd([per_seed[s]["eval_loss"] for s in seeds])
        paired = [s for s in seeds if s in base]
        dloss = mean_sd([per_seed[s]["eval_loss"] - base[s]["eval_loss"] for s in paired])
        cost = mean_sd([per_seed[s]["train_runtime_s"] / base[s]["train_runtime_s"] for s in paired])
        steps = per_seed[seeds[0]]["steps"]
        base_steps = base[paired[0]]["steps"] if paired else steps
        compute = CONFIGS[label]["passes"] * steps / base_steps if label in CONFIGS else None
        rows.append([f"`{label}`", steps, "-" if compute is None else f"{compute:.1f}x", fmt(*ppl, 1, 1),
                     fmt(*loss, 1, 3), fmt(*dloss, 1, 3), "-" if cost[0] is None else f"{cost[0]:.1f}x", len(seeds)])
        summary.append(dict(label=label, steps=steps, compute=compute, perplexity=ppl, loss=loss,
                            loss_vs_adamw=dloss, wall_vs_adamw=cost, seeds=seeds))
    md = ["# lm\n", __doc__.split("\n\n")[1].replace("\n", " ") + "\n",
          f"## held-out perplexity (headline: {status_note(status, 'headline')}; "
          f"extra: {status_note(status, 'extra')})\n",
          table(["configuration", "optimizer steps", "compute vs AdamW (passes x steps)", "held-out perplexity",
                 "held-out loss", "loss vs AdamW (paired)", "train wall time vs AdamW (shared machine)", "seeds"],
                rows)]
    _plot(summary, png)
    return summary, "\n".join(md)


def _plot(summary, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = next((s for s in summary if s["label"] == "adamw"), None)
    for s in summary:
        x = s["compute"] if s["compute"] is not None else 1.0
        ax.errorbar(x, s["perplexity"][0], yerr=s["perplexity"][1], fmt="o", capsize=2,
                    color="k" if s["label"].startswith("adamw") else "tab:blue")
        ax.annotate(s["label"], (x, s["perplexity"][0]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    if base is not None:
        ax.axhline(base["perplexity"][0], color="grey", lw=0.8)
    ax.set_xlabel("training compute relative to AdamW (forward+backward passes x steps)")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title("lm: small GPT-2 on pydoc topics")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
