"""label_noise: which SAM variant pays for itself on a noisy-label MLP, and at what cost.

Task: sklearn digits, 3-layer ReLU MLP (64-256-256-10), AdamW lr 1e-3, cosine, batch 32, 100
epochs (4000 steps), symmetric label noise on the training labels only, clean test accuracy at the
end of training (no early stopping: the noise is memorised by then, which is what SAM should resist).
The run seed sets the noise draw, the initialisation and the batch order; AdamW and every variant
share them, so gains are paired differences per seed.

Parts:
  headline    40% noise: AdamW and every variant at its paper's default (interval 2/5, late-phase 0.5)
  rho_sweep   40% noise: sam and asam at a few more radii
  noise_sweep 0/20/60% noise: AdamW, sam, asam and the best cheap variant of the headline
              (highest mean gain among variants with at most 1.2 backward passes per step)
  vit         the default tiny-ViT job (scripts/train_vit.py, configs/vit_digits.yaml: clean digits) for
              AdamW, sam, asam and the best cheap variant; test accuracy

  cost        short timing runs (8 epochs; saf and mesa 40, see COST_EPOCHS_OVERRIDE; 2 rounds,
              interleaved: every configuration once per round): mean process CPU time per optimizer step relative to AdamW's in the same round
              (CPU time, because on a shared machine wall time measures the neighbours)

Cost: the cost part's CPU-time ratio (median over rounds), and forward / backward passes per optimizer
step counted by hooks on the model during the headline runs (the mean over all steps, so interval,
late-phase and adaptive variants show their average).
"""

import os
import statistics

from studies._report import by_label, fmt, mean_sd, status_note, table

SEEDS = 3
PARTS = ("headline", "cost", "rho_sweep", "noise_sweep", "vit")
VIT_FLAGS = {"adamw": ["--sam_rho", "0"], "sam": [], "asam": ["--sam_variant", "asam", "--sam_rho", "0.5"]}
COST_EPOCHS = 8
COST_ROUNDS = 2
# SAF and MESA switch their extra term on after epoch 5 (saf_start): time them over 40 epochs so that it
# is on for 85% of the timed steps (94% in the 100-epoch headline runs), not 25%.
COST_EPOCHS_OVERRIDE = {"saf": 40, "mesa": 40}
EPOCHS = 100
NOISE = 0.4
CHEAP_PASSES = 1.2  # "cheap": at most this many backward passes per optimizer step
KEEP, MAX_COST = 0.9, 1.2

# Every variant at its paper's default (hf_sam's defaults; documented in each variant's module).
HEADLINE = {
    "adamw": None,
    "sam": dict(variant="sam", rho=0.05),
    "asam": dict(variant="asam", rho=0.5),       # ASAM paper, CIFAR-10: rho 0.5, eta 0.01
    "gsam": dict(variant="gsam"),
    "fsam": dict(variant="fsam"),
    "looksam": dict(variant="looksam"),
    "esam": dict(variant="esam"),
    "ssam": dict(variant="ssam"),
    "msam": dict(variant="msam", rho=1.0),       # MSAM's class default with AdamW
    "crsam": dict(variant="crsam"),
    "rsam": dict(variant="rsam"),
    "rwp": dict(variant="rwp"),
    "sampa": dict(variant="sampa"),
    "saf": dict(variant="saf"),
    "mesa": dict(variant="mesa"),
    "psam": dict(variant="psam"),
    "aesam": dict(variant="aesam"),
    "wasam": dict(variant="wasam"),
    "sam_interval2": dict(variant="sam", interval=2),
    "sam_interval5": dict(variant="sam", interval=5),
    "sam_late0.5": dict(variant="sam", start=0.5),
    "functional_sam": dict(variant="functional_sam"),
}
RHO_SWEEP = {f"sam_rho{r}": dict(variant="sam", rho=r) for r in (0.02, 0.1, 0.2, 0.5)}
RHO_SWEEP.update({f"asam_rho{r}": dict(variant="asam", rho=r) for r in (0.2, 1.0, 2.0)})
NOISE_LEVELS = (0.0, 0.2, 0.6)


def _registered(sam):
    from hf_sam.variants import available

    return sam is None or sam["variant"] in available()


def best_cheap(records):
    """The headline variant with the highest mean gain among those with <= CHEAP_PASSES backward passes/step."""
    rows = headline_rows(records)
    cheap = [r for r in rows if r["label"] != "adamw" and r["complete"] and r["backwards"] <= CHEAP_PASSES]
    return max(cheap, key=lambda r: r["gain"][0])["label"] if cheap else None


def runs(parts, seeds, quick, cache):
    if quick:
        return [dict(id=f"quick_{part}_{label}_s{s}", part=part, label=label, seed=s,
                     params=dict(sam=HEADLINE[label], noise=NOISE, epochs=1))
                for part in ("headline", "cost") for label in ("adamw", "sam") for s in seeds]
    out = []

    def add(part, label, sam, noise):
        if not _registered(sam):
            return
        tag = "" if noise == NOISE else f"_noise{noise}"
        for s in seeds:
            out.append(dict(id=f"{label}{tag}_s{s}", part=part, label=label + tag, seed=s,
                            params=dict(sam=sam, noise=noise, epochs=EPOCHS)))

    if "headline" in parts:
        for label, sam in HEADLINE.items():
            add("headline", label, sam, NOISE)
    if "cost" in parts:
        for s in range(1 if quick else COST_ROUNDS):  # round-major: each configuration once per round
            for label, sam in HEADLINE.items():
                if _registered(sam):
                    epochs = COST_EPOCHS_OVERRIDE.get(label, COST_EPOCHS)
                    tag = "" if epochs == COST_EPOCHS else f"_e{epochs}"
                    out.append(dict(id=f"cost_{label}{tag}_r{s}", part="cost", label=label, seed=s,
                                    params=dict(sam=sam, noise=NOISE, epochs=epochs)))
    if "rho_sweep" in parts:
        for label, sam in RHO_SWEEP.items():
            add("rho_sweep", label, sam, NOISE)
    if "noise_sweep" in parts:
        records = [r for r in cache.values() if r["part"] == "headline"]
        cheap = best_cheap(records) if _headline_complete(records, seeds) else None
        labels = ["adamw", "sam", "asam"] + ([cheap] if cheap else [])
        for noise in NOISE_LEVELS:
            for label in labels:
                add("noise_sweep", label, HEADLINE[label], noise)
    if "vit" in parts:
        records = [r for r in cache.values() if r["part"] == "headline"]
        cheap = best_cheap(records) if _headline_complete(records, seeds) else None
        for label in list(VIT_FLAGS) + ([cheap] if cheap else []):
            flags = VIT_FLAGS.get(label, ["--sam_variant", label])
            out += [dict(id=f"vit_{label}_s{s}", part="vit", label=label, seed=s, params=dict(flags=flags))
                    for s in seeds]
    return out


def _headline_complete(records, seeds):
    got = by_label(records, "headline")
    return all(set(seeds) <= set(got.get(label, {})) for label, sam in HEADLINE.items() if _registered(sam))


def execute(run, quick):
    from studies.digits import train_mlp

    if run["part"] == "vit":
        from studies._subprocess import run_script

        flags = ["--config", "configs/vit_digits.yaml", *run["params"]["flags"], "--seed", str(run["seed"]),
                 "--eval_strategy", "no", "--logging_strategy", "no", "--torch_threads", "1"]
        results, _, wall = run_script("train_vit.py", flags)
        return {"test_acc": float(results["test_accuracy"]), "process_wall_s": wall}

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    p = run["params"]
    return train_mlp(p["sam"], noise=p["noise"], seed=run["seed"], epochs=p["epochs"])


# ---- report ------------------------------------------------------------------------------------------
def cpu_costs(records, ref="adamw"):
    """{label: (median over rounds, sd over rounds) of mean CPU time per step relative to AdamW's}."""
    got = by_label(records, "cost")
    base = got.get(ref, {})
    out = {}
    for label, per_round in got.items():
        ratios = [per_round[r]["step_cpu_mean_s"] / base[r]["step_cpu_mean_s"] for r in per_round if r in base]
        if ratios:
            out[label] = (statistics.median(ratios), mean_sd(ratios)[1])
    return out


def headline_rows(records, part="headline", ref="adamw"):
    cpu_cost = cpu_costs(records, ref)
    got = by_label(records, part)
    base = got.get(ref, {})
    sam_gain = None
    rows = []
    for label, per_seed in got.items():
        seeds = sorted(set(per_seed) & set(base))
        if not seeds:
            continue
        acc = mean_sd([per_seed[s]["test_acc"] for s in seeds])
        gain = mean_sd([per_seed[s]["test_acc"] - base[s]["test_acc"] for s in seeds])
        cost = cpu_cost.get(label) or (None, None)
        rows.append(dict(label=label, n=len(seeds), acc=acc, gain=gain, cost=cost,
                         forwards=mean_sd([per_seed[s]["forwards_per_step"] for s in seeds])[0],
                         backwards=mean_sd([per_seed[s]["backwards_per_step"] for s in seeds])[0],
                         memorised=mean_sd([per_seed[s]["memorised_noisy_labels"] for s in seeds])[0],
                         complete=True))
        if label == "sam":
            sam_gain = gain[0]
    for r in rows:
        r["share_of_sam_gain"] = (r["gain"][0] / sam_gain) if sam_gain else None
        r["keeps_90_at_1.2x_time"] = bool(r["share_of_sam_gain"] is not None and r["label"] != "sam"
                                          and r["share_of_sam_gain"] >= KEEP and r["cost"][0] is not None
                                          and r["cost"][0] <= MAX_COST)
        r["keeps_90_at_1.2x_passes"] = bool(r["share_of_sam_gain"] is not None and r["label"] != "sam"
                                            and r["share_of_sam_gain"] >= KEEP and r["backwards"] <= MAX_COST)
    rows.sort(key=lambda r: -r["gain"][0])
    return rows


def _headline_table(rows):
    body = []
    for r in rows:
        share = "-" if r["share_of_sam_gain"] is None or r["label"] == "adamw" else f"{100 * r['share_of_sam_gain']:.0f}%"
        keeps = "-" if r["label"] in ("adamw", "sam") else (
            ("**yes**" if r["keeps_90_at_1.2x_time"] else "no") + " / " +
            ("**yes**" if r["keeps_90_at_1.2x_passes"] else "no"))
        body.append([f"`{r['label']}`", fmt(*r["acc"], 100), fmt(*r["gain"], 100), share,
                     "-" if r["cost"][0] is None else f"{r['cost'][0]:.2f}x",
                     f"{r['forwards']:.2f} / {r['backwards']:.2f}",
                     f"{100 * r['memorised']:.0f}%", keeps])
    return table(["variant", "clean test acc (%)", "gain vs AdamW (pp)", "share of SAM's gain",
                  "CPU time per step vs AdamW", "fwd / bwd passes per step", "noisy labels memorised",
                  ">= 90% of SAM's gain at <= 1.2x (time / passes)"], body)


def report(records, status, png, quick):
    rows = headline_rows(records)
    md = ["# label_noise\n",
          f"Digits MLP (64-256-256-10), AdamW, {EPOCHS} epochs, {int(NOISE * 100)}% symmetric label noise, "
          "clean test accuracy at the end of training, mean ± sd over seeds; gains are paired per seed. "
          "CPU time per step: mean process CPU time of an optimizer step relative to AdamW's, median over "
          f"the cost part's rounds ({COST_EPOCHS}-epoch timing runs; saf and mesa 40 epochs, so that their extra term "
          "is on). Passes are counted in the headline runs (training-mode forwards; backwards reaching the logits).\n",
          f"## headline ({status_note(status, 'headline')})\n", _headline_table(rows)]
    summary = {"headline": rows}
    cheap = best_cheap(records)
    summary["best_cheap"] = cheap
    # rho sweep: accuracies next to the headline's defaults
    rho_rows = []
    got_h, got_r = by_label(records, "headline"), by_label(records, "rho_sweep")
    for fam, default in (("sam", 0.05), ("asam", 0.5)):
        entries = [(default, got_h.get(fam, {}))] + [
            (float(lbl.split("rho")[1]), v) for lbl, v in got_r.items() if lbl.startswith(fam + "_rho")]
        for rho, per_seed in sorted(entries, key=lambda e: e[0]):
            if per_seed:
                rho_rows.append([f"`{fam}`", rho, fmt(*mean_sd([x["test_acc"] for x in per_seed.values()]), 100),
                                 len(per_seed)])
    if rho_rows:
        md += [f"\n## rho sweep at {int(NOISE * 100)}% noise ({status_note(status, 'rho_sweep')})\n",
               table(["variant", "rho", "clean test acc (%)", "seeds"], rho_rows)]
        summary["rho_sweep"] = rho_rows
    # noise sweep
    got_n = by_label(records, "noise_sweep")
    if got_n:
        labels = [lbl for lbl in got_h if any(k.startswith(lbl + "_noise") for k in got_n)]
        head = ["noise"] + [f"`{lbl}`" for lbl in labels]
        body = []
        for noise in NOISE_LEVELS + (NOISE,):
            row = [f"{int(noise * 100)}%"]
            for lbl in labels:
                per_seed = got_h.get(lbl, {}) if noise == NOISE else got_n.get(f"{lbl}_noise{noise}", {})
                row.append(fmt(*mean_sd([x["test_acc"] for x in per_seed.values()]), 100) if per_seed else "-")
            body.append(row)
        body.sort(key=lambda r: int(r[0][:-1]))
        md += [f"\n## noise sweep ({status_note(status, 'noise_sweep')})\n", table(head, body)]
        summary["noise_sweep"] = body
    got_v = by_label(records, "vit")
    if got_v:
        vit_rows = [[f"`{lbl}`", fmt(*mean_sd([x["test_acc"] for x in per_seed.values()]), 100), len(per_seed)]
                    for lbl, per_seed in got_v.items()]
        md += [f"\n## the default tiny ViT on clean digits ({status_note(status, 'vit')})\n",
               table(["configuration", "test accuracy (%)", "seeds"], vit_rows)]
        summary["vit"] = vit_rows
    _plot(rows, png)
    return summary, "\n".join(md)


def _plot(rows, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    for ax, key, xlabel in ((axes[0], "cost", "CPU time per step relative to AdamW (measured)"),
                            (axes[1], "backwards", "backward passes per optimizer step (counted)")):
        for r in rows:
            x = r["cost"][0] if key == "cost" else r["backwards"]
            if x is None:
                continue
            family = r["label"].split("_")[0]
            color = "k" if r["label"] == "adamw" else ("tab:red" if family in ("sam", "asam") else "tab:blue")
            ax.errorbar(x, 100 * r["gain"][0], yerr=100 * r["gain"][1], fmt="o", color=color, ms=5, capsize=2)
            ax.annotate(r["label"], (x, 100 * r["gain"][0]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(MAX_COST, color="grey", lw=0.8, ls="--")
        sam = next((r for r in rows if r["label"] == "sam"), None)
        if sam is not None:
            ax.axhline(100 * KEEP * sam["gain"][0], color="tab:red", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("clean test accuracy gain over AdamW (pp, mean ± sd)")
    fig.suptitle(f"label_noise: digits MLP, {int(NOISE * 100)}% symmetric noise — gain vs cost "
                 "(dotted: 90% of SAM's gain; dashed: 1.2x)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
