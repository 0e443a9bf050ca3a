"""mupp_transfer: does the best rho transfer across widths with muP^2's layerwise scaling? (Haas et al. 2024)

The digits MLP (64-W-W-10, ReLU) written in muP by hand (hidden init 1/fan_in, readout std
sqrt(64)/W, Adam LR of hidden and readout weights scaled by 64/W; studies/digits.py), at widths
64, 128, 256, 512, 40% symmetric label noise, 100 epochs (4000 steps, the label_noise regime: AdamW
memorises the wrong labels and SAM helps; at 15 epochs SAM did not beat AdamW's loss at any rho, so
a best rho there is only the grid's smallest). SAM with rho_scaling "none" (plain SAM: one global
radius) and "mupp" (hf_sam's muP^2, decoupled denominator, base width 64; roles: first layer and
hidden biases input-like, hidden matrices hidden, readout weight output, readout bias fixed). At
the base width both are the same rule (tests/test_benchmarks.py checks it), so the base width's
runs serve both. rho = 0 (AdamW) is each width's reference. Clean test loss and accuracy at the end.

Protocol (the muP recipe). Part "tune": AdamW's base LR at the base width 64 only, seed 0, lr 3e-4,
1e-3, 3e-3 (extended by x3 while the best sits at the grid's edge), selected by the final clean test
loss: digits.train_mlp has no validation split, so the tuning seed (0) is kept apart from the
reporting seeds (1-3) instead; the same LR is then used at every width (muP scales the hidden and
readout LR by 64/W). Part "transfer": seeds 1-3, rho 0.03, 0.1, 0.3, 1, 3; after the first seed
the grid grows by one x3 step past any edge where a width's best rho (by loss or by accuracy) sits,
at most twice; seeds 2 and 3 then run that grid less the radii at which seed 1 collapsed at every
width (clean test accuracy < 20%, chance 10%: rho 3), to fit the budget (~30 min of one core; the
runs took ~1.7x the timings measured before on this shared machine). A cell with fewer seeds says n.

muP^2 predicts that with "mupp" the best rho stays put as the width grows, and that with "none" the
perturbation of the hidden layers fades with width (so the best rho drifts, or SAM stops mattering).
"""

import statistics

from studies._report import mean_sd, status_note, table, tune_with_extension

SEEDS = 3  # reporting seeds 1..SEEDS (run.py's --seeds N gives 0..N-1, shifted by one here); seed 0 tunes
TUNE_SEED = 0
PARTS = ("tune", "transfer")
WIDTHS = (64, 128, 256, 512)
EPOCHS = 100
TUNE_LRS = (3e-4, 1e-3, 3e-3)
RHOS = (0.03, 0.1, 0.3, 1.0, 3.0)
MAX_EXTEND = 2
COLLAPSE = 0.2  # clean test accuracy below this (chance is 0.1) = training collapsed
SCALINGS = ("none", "mupp")
BASE = 64
NOISE = 0.4
METRICS = (("test_loss", "clean test loss", min), ("test_acc", "clean test accuracy (%)", max))
COMMAND = "PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/run.py mupp_transfer"


def _g(x):
    return f"{x:g}"


def _tune_run(lr):
    return dict(id=f"tune_w{BASE}_lr{_g(lr)}_s{TUNE_SEED}", part="tune", label=f"tune_lr{_g(lr)}", seed=TUNE_SEED,
                params=dict(width=BASE, rho=0.0, scaling=None, epochs=EPOCHS, lr=lr))


def tuning(cache):
    """(tuning runs planned so far, selected LR or None while unfinished)."""
    return tune_with_extension(TUNE_LRS, _tune_run, lambda result: result["test_loss"], cache, MAX_EXTEND,
                               lambda lr, up: float(f"{lr * 3 if up else lr / 3:.3g}"))


def _width_runs(part, w, rhos, seed, epochs, lr):
    out = [dict(id=f"w{w}_rho0_lr{_g(lr)}_s{seed}", part=part, label=f"w{w}_rho0", seed=seed,
                params=dict(width=w, rho=0.0, scaling=None, epochs=epochs, lr=lr))]
    for scaling in SCALINGS:
        if scaling == "mupp" and w == BASE:
            continue  # at the base width muP^2 is plain SAM: the "none" runs stand for both
        for rho in rhos:
            out.append(dict(id=f"w{w}_{scaling}_rho{_g(rho)}_lr{_g(lr)}_s{seed}", part=part, seed=seed,
                            label=f"w{w}_{scaling}_rho{_g(rho)}",
                            params=dict(width=w, rho=rho, scaling=scaling, epochs=epochs, lr=lr)))
    return out


def grid(cache, first_seed, lr):
    """The rho grid: RHOS, grown past an edge where the first seed's best rho sits (at most MAX_EXTEND times).
    Returns (rhos, settled)."""
    rhos = list(RHOS)
    for _ in range(MAX_EXTEND + 1):
        planned = [r for w in WIDTHS for r in _width_runs("transfer", w, rhos, first_seed, EPOCHS, lr)]
        if any(r["id"] not in cache for r in planned):
            return rhos, False
        data = _collect([cache[r["id"]] for r in planned])
        low = high = False
        for (scaling, w), d in data.items():
            for metric, _, better in METRICS:
                best = better(rhos, key=lambda r: d[r][0][metric])
                low |= best == rhos[0]
                high |= best == rhos[-1]
        if not (low or high):
            return rhos, True
        if high:
            rhos.append(float(f"{rhos[-1] * 3:.3g}"))
        if low:
            rhos.insert(0, float(f"{rhos[0] / 3:.3g}"))
    return rhos, True


def runs(parts, seeds, quick, cache):
    if quick:
        return [r for w in (64, 128) for s in seeds for r in _width_runs("transfer", w, (0.1,), s, 1, 1e-3)]
    planned, lr = tuning(cache)  # the transfer runs need the tuned LR: the tuning runs first whatever parts say
    out = list(planned)
    if "transfer" not in parts or lr is None:
        return out
    report_seeds = [s + 1 for s in seeds]
    rhos, settled = grid(cache, report_seeds[0], lr)
    out += [r for w in WIDTHS for r in _width_runs("transfer", w, rhos, report_seeds[0], EPOCHS, lr)]
    if settled:  # seed-major; the later seeds skip the radii at which the first seed collapsed at every width
        first = [cache[r["id"]] for r in out if r["part"] == "transfer" and r["id"] in cache]
        later = [rho for rho in rhos if not _collapsed(first, rho)]
        for s in report_seeds[1:]:
            out += [r for w in WIDTHS for r in _width_runs("transfer", w, later, s, EPOCHS, lr)]
    return out


def _collapsed(records, rho):
    """True when every run of the first seed at this rho ended near chance (clean test accuracy < COLLAPSE)."""
    accs = [r["result"]["test_acc"] for r in records if r["params"]["rho"] == rho]
    return bool(accs) and max(accs) < COLLAPSE


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
                     lr=p.get("lr", 1e-3), parametrization="mup", base_width=BASE)


def _collect(records):
    """{(scaling, width): {rho: [results, in seed order]}}; rho 0 and the base width are filed under both."""
    out = {}
    for rec in sorted(records, key=lambda r: r["seed"]):
        p = rec["params"]
        shared = p["scaling"] is None or p["width"] == BASE
        for scaling in (SCALINGS if shared else (p["scaling"],)):
            out.setdefault((scaling, p["width"]), {}).setdefault(p["rho"], []).append(
                dict(rec["result"], seed=rec["seed"]))
    return out


def report(records, status, png, quick):
    md = ["# mupp_transfer\n", " ".join(__doc__.split("\n\n")[1].split()) + "\n",
          " ".join(__doc__.split("\n\n")[2].split()) + "\n",
          f"Reproduce: `{COMMAND}` (resumes from benchmarks/results/cache/mupp_transfer; `--report-only` "
          "rewrites this file from the cache).\n"]
    summary = {}
    tune = sorted((r["params"]["lr"], r["result"]) for r in records if r["part"] == "tune")
    if tune:
        best = min(tune, key=lambda t: t[1]["test_loss"])[0]
        md += [f"\n## part tune: AdamW base LR at width {BASE}, seed {TUNE_SEED}, {EPOCHS} epochs "
               f"({status_note(status, 'tune')})\n",
               table(["lr", "clean test loss", "clean test accuracy (%)", "noisy labels memorised (%)"],
                     [[_g(lr) + (" (selected)" if lr == best else ""), f"{r['test_loss']:.4f}",
                       f"{100 * r['test_acc']:.1f}", f"{100 * r['memorised_noisy_labels']:.1f}"] for lr, r in tune])]
        summary["tune"] = {_g(lr): dict(test_loss=r["test_loss"], test_acc=r["test_acc"]) for lr, r in tune}
        summary["selected_lr"] = best
    recs = [r for r in records if r["part"] == "transfer"]
    if not recs:
        md.append(f"\n## part transfer: not run yet ({status_note(status, 'transfer')})\n")
    else:
        seeds = sorted({r["seed"] for r in recs})
        md.append(f"\n## part transfer: {recs[0]['params']['epochs']} epochs, lr {_g(recs[0]['params']['lr'])}, "
                  f"seeds {', '.join(map(str, seeds))} ({status_note(status, 'transfer')})\n")
        data = _collect(recs)
        summary["transfer"] = _part_tables(data, md)
        _plot(data, sorted({w for _, w in data}), png, f"{recs[0]['params']['epochs']} epochs")
    return summary, "\n".join(md)


def _best(d, rhos, metric, better, pick=None):
    """Best rho > 0 by the mean over seeds (pick: one seed's value instead)."""
    vals = {}
    for r in rhos:
        xs = [x[metric] for x in d.get(r, []) if pick is None or x["seed"] == pick]
        if r > 0 and xs:
            vals[r] = statistics.fmean(xs)
    return better(vals, key=vals.get) if vals else None


def _part_tables(data, md):
    widths = sorted({w for _, w in data})
    rhos = sorted({r for d in data.values() for r in d})
    sam_rhos = [r for r in rhos if r > 0]
    seeds = sorted({x["seed"] for d in data.values() for v in d.values() for x in v})
    summary = {"rhos": sam_rhos, "best_rho": {}, "best_rho_per_seed": {}}
    best_rows = []
    for metric, name, better in METRICS:
        scale, digits = (1, 4) if metric == "test_loss" else (100, 1)
        rows = []
        for scaling in SCALINGS:
            for w in widths:
                d = data.get((scaling, w), {})
                cells = []
                for rho in rhos:
                    xs = [x[metric] for x in d.get(rho, [])]
                    m, sd = mean_sd(xs)
                    cells.append("-" if m is None else f"{m * scale:.{digits}f} ± {sd * scale:.{digits}f}" +
                                 (f" (n={len(xs)})" if len(xs) < len(seeds) else ""))
                best = _best(d, rhos, metric, better)
                per_seed = [_best(d, rhos, metric, better, pick=s) for s in seeds]
                summary["best_rho"].setdefault(metric, {}).setdefault(scaling, {})[w] = best
                summary["best_rho_per_seed"].setdefault(metric, {}).setdefault(scaling, {})[w] = per_seed
                edge = best is not None and best in (sam_rhos[0], sam_rhos[-1])
                rows.append([scaling, w] + cells + ["-" if best is None else _g(best) + (" (edge)" if edge else ""),
                                                    " / ".join("-" if b is None else _g(b) for b in per_seed)])
        md += [f"\n### {name} by rho, mean ± sd over seeds (rho 0 = AdamW)\n",
               table(["rho_scaling", "width"] + [_g(r) for r in rhos] + ["best rho (> 0, mean)",
                                                                        "best rho per seed"], rows)]
    for scaling in SCALINGS:
        row = [scaling]
        for metric, _, _ in METRICS:
            row.append(", ".join(f"{w}: {_g(summary['best_rho'][metric][scaling][w]) if summary['best_rho'][metric][scaling][w] is not None else '-'}"
                                 for w in widths))
        best_rows.append(row)
    collapsed = {}
    for scaling, row in zip(SCALINGS, best_rows):
        for w in widths:
            d = data.get((scaling, w), {})
            collapsed.setdefault(scaling, {})[w] = [r for r in sam_rhos if d.get(r) and
                                                    max(x["test_acc"] for x in d[r]) < COLLAPSE]
        row.append(", ".join(f"{w}: {_g(min(c)) if c else '-'}" for w, c in collapsed[scaling].items()))
    summary["collapsed_rhos"] = collapsed
    md += ["\n### best rho (mean over seeds) against width\n",
           table(["rho_scaling", "by clean test loss (width: rho)", "by clean test accuracy (width: rho)",
                  f"smallest rho at which every seed collapsed (acc < {100 * COLLAPSE:.0f}%)"], best_rows)]
    return summary


def _plot(data, widths, png, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex=True)
    colors = plt.cm.viridis([i / max(1, len(widths) - 1) for i in range(len(widths))])
    for row, (metric, name, better) in enumerate(METRICS):
        scale = 1 if metric == "test_loss" else 100
        for col, scaling in enumerate(SCALINGS):
            ax = axes[row, col]
            for w, c in zip(widths, colors):
                d = data.get((scaling, w), {})
                pts = sorted((r, *mean_sd([x[metric] * scale for x in v])) for r, v in d.items() if r > 0 and v)
                if pts:
                    ax.errorbar([r for r, _, _ in pts], [m for _, m, _ in pts], yerr=[s for _, _, s in pts],
                                fmt="o-", color=c, capsize=2, label=f"width {w}")
                    best = better(pts, key=lambda t: t[1])
                    ax.plot(best[0], best[1], "*", color=c, ms=14)
                if d.get(0.0):
                    ax.axhline(mean_sd([x[metric] * scale for x in d[0.0]])[0], color=c, ls=":", lw=1)
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"rho_scaling = {scaling}" + (" (plain SAM)" if scaling == "none" else " (muP^2)"))
            if row == 1:
                ax.set_xlabel("rho (base width 64)")
            if col == 0:
                ax.set_ylabel(f"{name}\n(dotted: AdamW; star: best rho)")
    axes[0, 1].legend(fontsize=8)
    fig.suptitle(f"mupp_transfer: muP MLP on digits, 40% label noise ({title}; mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
