#!/usr/bin/env python
"""Run a study: python benchmarks/run.py STUDY [--quick] [--seeds N] [--parts P ...] [--out DIR]

Studies (benchmarks/studies/<name>.py): label_noise, lm, mupp_transfer, lora. Each run's result is
cached as JSON in OUT/cache/STUDY/<run id>.json the moment it finishes, so an interrupted study
resumes where it stopped (cached runs are never rerun; delete a file to redo that run). After the
runs the study is summarised into OUT/STUDY.json (every run, and per configuration which seeds are
done and whether it is complete), OUT/STUDY.md (tables) and OUT/STUDY.png (plot).

    python benchmarks/run.py label_noise                      # the full grid, 3 seeds, resumes
    python benchmarks/run.py label_noise --parts headline     # only some parts of the grid
    python benchmarks/run.py label_noise --report-only        # rewrite JSON/tables/plot from the cache
    python benchmarks/run.py lm --quick --out /tmp/q          # one tiny configuration, seconds
    python benchmarks/run.py label_noise --worker 0/2 & python benchmarks/run.py label_noise --worker 1/2
                                                              # two processes share the grid

OUT defaults to benchmarks/results (with --quick: a fresh temporary folder, never the repo).
Run it alone on a quiet machine for timings that mean something: cost is measured wall time.
"""

import argparse
import datetime
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent

STUDIES = ("label_noise", "lm", "mupp_transfer", "lora")


def cache_path(out, study, run_id):
    return Path(out) / "cache" / study / f"{run_id}.json"


def load_cache(out, study):
    folder = Path(out) / "cache" / study
    results = {}
    if folder.is_dir():
        for f in sorted(folder.glob("*.json")):
            rec = json.loads(f.read_text())
            results[rec["id"]] = rec
    return results


def write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def completion(planned, cache):
    """Per part and configuration: planned seeds, seeds done, complete or not."""
    parts = {}
    for run in planned:
        cfg = parts.setdefault(run["part"], {}).setdefault(run["label"], {"seeds_planned": [], "seeds_done": []})
        cfg["seeds_planned"].append(run["seed"])
        if run["id"] in cache:
            cfg["seeds_done"].append(run["seed"])
    for part in parts.values():
        for cfg in part.values():
            cfg["complete"] = sorted(cfg["seeds_done"]) == sorted(cfg["seeds_planned"])
    return parts


def owner(run_id, n):
    """The worker (0..n-1) that runs `run_id`: a stable hash, the same in every process."""
    return zlib.crc32(run_id.encode()) % n


def failed_since(out, study, t_start):
    """Ids of the runs a worker of this launch marked failed (cache/STUDY/<id>.failed, written after t_start)."""
    folder = Path(out) / "cache" / study
    return {f.stem for f in folder.glob("*.failed") if f.stat().st_mtime >= t_start} if folder.is_dir() else set()


def parse_worker(parser, text):
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        parser.error(f"--worker {text!r}: use I/N with 0 <= I < N, e.g. 0/2")
    if not 0 <= i < n:
        parser.error(f"--worker {text!r}: use I/N with 0 <= I < N, e.g. 0/2")
    return i, n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=STUDIES)
    p.add_argument("--quick", action="store_true", help="One tiny configuration in seconds (a smoke test).")
    p.add_argument("--seeds", type=int, default=None, help="Seeds 0..N-1 per configuration (default: the study's).")
    p.add_argument("--parts", nargs="*", default=None, help="Only these parts of the study's grid (default: all).")
    p.add_argument("--out", default=None, help="Results folder (default benchmarks/results; --quick: a temp folder).")
    p.add_argument("--report-only", action="store_true", help="Summarise the cache without running anything.")
    p.add_argument("--worker", default=None, metavar="I/N",
                   help="Run only the pending runs whose id hashes to I of N (start N such workers, I = 0..N-1, on the "
                        "same parts); each rereads the cache before every run, so a stage that waits for another "
                        "worker's runs starts once they are cached.")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="Start no new run after this many minutes (the cache keeps what finished).")
    args = p.parse_args(argv)

    study = importlib.import_module(f"studies.{args.study}")
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix=f"hf_sam_{args.study}_")) if args.quick
                                            else HERE / "results")
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else study.SEEDS)))
    parts = args.parts or list(study.PARTS)
    unknown = sorted(set(parts) - set(study.PARTS))
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)} for {args.study}; choose from {', '.join(study.PARTS)}")
    worker = parse_worker(p, args.worker)
    cache = load_cache(out, args.study)
    t_start = time.time()
    failures = []
    while not args.report_only:
        if worker is not None:  # the other workers' runs, and the runs that failed in one of them
            cache = load_cache(out, args.study)
            failures = sorted(set(failures) | failed_since(out, args.study, t_start))
        planned = study.runs(parts, seeds, args.quick, cache)
        pending = [r for r in planned if r["id"] not in cache and r["id"] not in failures]
        if not pending:
            break
        if args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes:
            print(f"[run] --max-minutes reached; {len(pending)} runs left (rerun the same command to resume)")
            break
        mine = pending if worker is None else [r for r in pending if owner(r["id"], worker[1]) == worker[0]]
        if not mine:  # the other workers' runs are pending: wait for them (a later stage may need them)
            time.sleep(5)
            continue
        run = mine[0]
        print(f"[run] {args.study} {run['id']} ({len(pending)} pending)", flush=True)
        t0 = time.time()
        try:
            result = study.execute(run, args.quick)
        except Exception:  # one broken configuration must not lose the others
            traceback.print_exc()
            failures.append(run["id"])
            if worker is not None:  # tell the other workers not to wait for it
                marker = cache_path(out, args.study, run["id"]).with_suffix(".failed")
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(traceback.format_exc())
            continue
        rec = dict(run, result=result, run_wall_s=round(time.time() - t0, 2),
                   finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        write_json(cache_path(out, args.study, run["id"]), rec)
        cache[run["id"]] = rec
        print(f"[run]   done in {rec['run_wall_s']} s: " +
              ", ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)), flush=True)

    planned = study.runs(list(study.PARTS), seeds, args.quick, cache)
    status = completion(planned, cache)
    records = [cache[r["id"]] for r in planned if r["id"] in cache]
    summary, markdown = study.report(records, status, out / f"{args.study}.png", args.quick)
    complete = all(c["complete"] for part in status.values() for c in part.values())
    write_json(out / f"{args.study}.json", {
        "study": args.study, "quick": args.quick, "seeds": seeds, "complete": complete,
        "parts_complete": {name: all(c["complete"] for c in part.values()) for name, part in status.items()},
        "status": status, "summary": summary, "failed_runs": failures, "runs": records,
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    (out / f"{args.study}.md").write_text(markdown)
    print(f"[run] wrote {out / (args.study + '.json')}, .md, .png (complete: {complete})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
