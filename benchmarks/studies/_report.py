"""Small helpers the study reports share: mean +- sd, markdown tables, grouping of cached runs."""

import statistics


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(mean, sd, scale=1.0, digits=1):
    if mean is None:
        return "-"
    return f"{mean * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def by_label(records, part):
    """{label: {seed: result}} for the cached runs of one part."""
    out = {}
    for rec in records:
        if rec["part"] == part:
            out.setdefault(rec["label"], {})[rec["seed"]] = rec["result"]
    return out


def status_note(status, part):
    cfgs = status.get(part, {})
    done = sum(c["complete"] for c in cfgs.values())
    return f"{done}/{len(cfgs)} configurations complete"
