"""mupp_transfer: does the best rho transfer across widths with muP^2's layerwise scaling? (Haas et al. 2024)

The digits MLP (64-W-W-10, ReLU) written in muP by hand (hidden init 1/fan_in, readout std
sqrt(64)/W, Adam LR of hidden and readout weights scaled by 64/W; studies/digits.py), at widths
64..512, 40% symmetric label noise, AdamW lr 1e-3 at the base width 64, 15 epochs (part "sweep") or
100 epochs (part "long", the label_noise regime, where SAM helps). SAM at
several rho with rho_scaling "none" (plain SAM: one global radius) and "mupp" (hf_sam's muP^2,
decoupled denominator, base width 64; roles: first layer and hidden biases input-like, hidden
matrices hidden, readout weight output, readout bias fixed). At the base width both are the same
rule (tests/test_benchmarks.py checks it), so the base width's runs serve both. rho = 0 (AdamW) is each width's reference. Clean test loss and accuracy at the end.

muP^2 predicts that with "mupp" the best rho stays put as the width grows, and that with "none" the
perturbation of the hidden layers fades with width (so the best rho drifts, or SAM stops mattering).
"""


from studies._report import mean_sd, status_note, table

SEEDS = 1
PARTS = ("sweep", "long")
WIDTHS = (64, 128, 256, 512)
# part -> (rhos, epochs). "sweep" (15 epochs) ends before the noise is memorised; "long" (100 epochs, as
# label_noise) is the regime where SAM helps, so its best rho can sit inside the grid.
GRIDS = {"sweep": ((0.03, 0.1, 0.3, 1.0), 15), "long": ((0.01, 0.03, 0.1, 0.3), 100)}
SCALINGS = ("none", "mupp")
BASE = 64
NOISE = 0.4


def runs(parts, seeds, quick, cache):
    grids = {"sweep": ((0.1,), 1)} if quick else {p: GRIDS[p] for p in parts}
    widths = (64, 128) if quick else WIDTHS
    out = []
    for part, (rhos, epochs) in grids.items():
        pre = "" if part == "sweep" else f"{part}_"
        for w in widths:
            for s in seeds:
                out.append(dict(id=f"{pre}w{w}_rho0_s{s}", part=part, label=f"w{w}_rho0", seed=s,
                                params=dict(width=w, rho=0.0, scaling=None, epochs=epochs)))
            for scaling in SCALINGS:
                if scaling == "mupp" and w == BASE:
                    continue  # at the base width muP^2 is plain SAM: the "none" runs stand for both
                for rho in rhos:
                    for s in seeds:
                        out.append(dict(id=f"{pre}w{w}_{scaling}_rho{rho}_s{s}", part=part, seed=s,
                                        label=f"w{w}_{scaling}_rho{rho}",
                                        params=dict(width=w, rho=rho, scaling=scaling, epochs=epochs)))
    return out


def execute(run, quick):
    import torch

    from studies.digits import MUPP_ROLES, train_mlp

    torch.set_num_threads(1)
    p = run["params"]
    sam = None if p["rho"] == 0 else dict(variant="sam", rho=p["rho"])
    mupp = None
    if p["scaling"] == "mupp":
        mupp = dict(rho_scaling="mupp", mupp_base_width=BASE, mupp_width=p["width"], mupp_roles=MUPP_ROLES)
    return train_mlp(sam, mupp=mupp, noise=NOISE, seed=run["seed"], epochs=p["epochs"], width=p["width"],
                     parametrization="mup", base_width=BASE)


def _collect(records):
    """{(scaling, width): {rho: [results]}}; rho 0 is filed under both scalings."""
    out = {}
    for rec in records:
        p = rec["params"]
        shared = p["scaling"] is None or p["width"] == BASE
        for scaling in (SCALINGS if shared else (p["scaling"],)):
            out.setdefault((scaling, p["width"]), {}).setdefault(p["rho"], []).append(rec["result"])
    return out


def report(records, status, png, quick):
    md = ["# mupp_transfer\n", __doc__.split("\n\n")[1].replace("\n", " ") + "\n"]
    summary = {}
    plotted = None
    for part in PARTS:
        recs = [r for r in records if r["part"] == part]
        if not recs:
            md.append(f"\n## part {part}: not run yet ({status_note(status, part)})\n")
            continue
        epochs = recs[0]["params"]["epochs"]
        md.append(f"\n## part {part}: {epochs} epochs ({status_note(status, part)})\n")
        summary[part] = _part_tables(_collect(recs), md)
        if status.get(part) and all(c["complete"] for c in status[part].values()):
            plotted = (part, epochs, _collect(recs))
    if plotted is not None:  # the longest complete part
        _plot(plotted[2], sorted({w for _, w in plotted[2]}), png, f"{plotted[0]}, {plotted[1]} epochs")
    return summary, "\n".join(md)


def _part_tables(data, md):
    widths = sorted({w for _, w in data})
    rhos = sorted({r for d in data.values() for r in d})
    summary = {"best_rho": {}}
    for metric, name, better in (("test_loss", "clean test loss", min), ("test_acc", "clean test accuracy (%)", max)):
        rows = []
        for scaling in SCALINGS:
            for w in widths:
                d = data.get((scaling, w), {})
                cells = []
                for rho in rhos:
                    m, sd = mean_sd([x[metric] for x in d.get(rho, [])])
                    cells.append("-" if m is None else (f"{m:.4f}" if metric == "test_loss" else f"{100 * m:.1f}"))
                sam_rhos = [r for r in rhos if r > 0 and d.get(r)]
                best = better(sam_rhos, key=lambda r: mean_sd([x[metric] for x in d[r]])[0]) if sam_rhos else None
                summary["best_rho"].setdefault(metric, {}).setdefault(scaling, {})[w] = best
                rows.append([scaling, w] + cells + ["-" if best is None else best])
        md += [f"\n### {name} by rho (rho 0 = AdamW)\n",
               table(["rho_scaling", "width"] + [str(r) for r in rhos] + ["best rho (> 0)"], rows)]
    return summary


def _plot(data, widths, png, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    colors = plt.cm.viridis([i / max(1, len(widths) - 1) for i in range(len(widths))])
    for ax, scaling in zip(axes, SCALINGS):
        for w, c in zip(widths, colors):
            d = data.get((scaling, w), {})
            pts = sorted((r, mean_sd([x["test_loss"] for x in v])[0]) for r, v in d.items() if r > 0 and v)
            if pts:
                ax.plot([r for r, _ in pts], [y for _, y in pts], "o-", color=c, label=f"width {w}")
                best = min(pts, key=lambda t: t[1])
                ax.plot(*best, "*", color=c, ms=14)
            if d.get(0.0):
                ax.axhline(mean_sd([x["test_loss"] for x in d[0.0]])[0], color=c, ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("rho (base width 64)")
        ax.set_title(f"rho_scaling = {scaling}" + (" (plain SAM)" if scaling == "none" else " (muP^2)"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("clean test loss (dotted: AdamW at that width; star: best rho)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"mupp_transfer: muP MLP on digits, 40% label noise ({title})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
