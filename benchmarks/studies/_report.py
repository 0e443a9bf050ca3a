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


def tune_with_extension(values, make_run, score, cache, max_extend, grow):
    """A 1-D grid search that grows past an edge: run `make_run(v)` for every value, pick the lowest
    `score(result)`, and while the best sits at an end of the grid add `grow(end, up)` beyond it (at most
    max_extend times). Returns (runs planned so far, the selected value or None while runs are missing);
    after max_extend extensions the edge value is returned (the study's report says so)."""
    values = sorted(values)
    for _ in range(max_extend + 1):
        planned = [make_run(v) for v in values]
        if any(r["id"] not in cache for r in planned):
            return planned, None
        got = {v: score(cache[r["id"]]["result"]) for v, r in zip(values, planned)}
        best = min(got, key=got.get)
        if best == values[-1]:
            values.append(grow(values[-1], True))
        elif best == values[0]:
            values.insert(0, grow(values[0], False))
        else:
            return planned, best
    return planned, best
