"""Batch inference throughput: `medray predict` on Ray Data (1 and 2 predictor actors) against the
in-process ceiling (`Bundle.predict` on arrays already in memory: no reading, no decoding), for
the image and sequence models at 1×, 10× and 100× the public data (synthetic data in the users'
formats, written by benchmarks/training.py's generator: PNG class folders, FASTA).

    .venv/bin/python benchmarks/batch_inference.py                          # ultrasound + genomic, 1× 10× 100×
    .venv/bin/python benchmarks/batch_inference.py --tasks genomic --scales 1 10

Each `medray predict` run is its own process with a fresh local Ray instance, as a user starts it,
writing a folder of Parquet parts. Figures per run: items/s over the whole command (`job`, with
Ray's start-up) and after it (`steady`: from the moment Ray is up: scan, read, preprocess, score,
write), and the driver's peak RSS (VmHWM). The ceiling is measured on up to 5,000 items already
decoded in memory (throughput per item does not depend on the count). Bundles: the task's
default model trained for one epoch on the 1× data (the speed of a forward pass does not depend
on how well it was trained). Results: benchmarks/results/batch_inference.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
CEILING_ITEMS = 5_000


def bundle_for(task: str, root: Path) -> Path:
    from training import make_data

    out = root / "bundles" / task
    if not (out / "bundle.json").exists():
        data, group = make_data(task, 1, root / "data")
        from medray.train import train

        train(task, data, str(out), epochs=1, workers=2, storage=str(root / "runs"), name=f"bi-{task}",
              group_column=group, log=lambda *a: None)
    return out


def ceiling(bundle_dir: Path, data: str) -> dict:
    """Bundle.predict on inputs already decoded in memory: the first CEILING_ITEMS of `data`,
    read here with the in-process readers' own functions (not timed)."""
    import itertools

    import numpy as np

    from medray.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    if bundle.task == "ultrasound":
        from medray.data.ultrasound import load_image

        files = sorted(itertools.islice((p for p in Path(data).rglob("*.png")), CEILING_ITEMS))
        inputs = np.stack([load_image(str(f), bundle.preprocessor.size) for f in files])
    else:
        from Bio import SeqIO

        with open(data) as f:
            inputs = [str(r.seq).upper() for r in itertools.islice(SeqIO.parse(f, "fasta"), CEILING_ITEMS)]
    bundle.predict(inputs[:256])  # warm-up
    t0 = time.perf_counter()
    bundle.predict(inputs)
    s = time.perf_counter() - t0
    return {"items": len(inputs), "seconds": round(s, 2), "items_per_s": round(len(inputs) / s, 1)}


def child_predict(bundle_dir: str, data: str, out: str, actors: int) -> dict:
    from medray.bundle import load_bundle
    from medray.inference import predict
    from medray.ray_runtime import ensure_ray

    t0 = time.time()
    bundle = load_bundle(bundle_dir)
    ensure_ray()
    t_ray = time.time()
    s = predict(bundle, data, out, engine="ray", actors=actors)
    t_end = time.time()
    return {"rows": s["rows"], "ray_init_s": round(t_ray - t0, 1), "seconds": round(t_end - t0, 1),
            "steady_items_per_s": round(s["rows"] / (t_end - t_ray), 1),
            "job_items_per_s": round(s["rows"] / (t_end - t0), 1), "nodes": len(s.get("read_on_nodes") or {})}


def peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_child(kind: str, *args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, *map(str, args)]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not lines:
        raise SystemExit(f"{kind} {args} failed:\n{r.stderr[-4000:]}")
    out = json.loads(lines[-1][7:])
    out["process_s"] = round(time.time() - t0, 1)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["ultrasound", "genomic"])
    ap.add_argument("--scales", nargs="+", type=int, default=[1, 10, 100])
    ap.add_argument("--actors", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--workdir", default=os.environ.get("MEDRAY_BENCH_DIR", "/tmp/medray-bench"))
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "predict":
            out = child_predict(rest[0], rest[1], rest[2], int(rest[3]))
        elif kind == "bundle":
            out = {"bundle": str(bundle_for(rest[0], Path(rest[1])))}
        else:
            out = ceiling(Path(rest[0]), rest[1])
        out["peak_rss_mb"] = round(peak_rss_mb())
        print("RESULT " + json.dumps(out), flush=True)
        return
    from training import make_data

    root = Path(args.workdir)
    path = RESULTS / "batch_inference.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for task in args.tasks:
        bundle = run_child("bundle", task, root)["bundle"]
        for scale in args.scales:
            data, _ = make_data(task, scale, root / "data")
            ceil = run_child("ceiling", bundle, data)
            runs = {}
            (root / "predictions").mkdir(parents=True, exist_ok=True)
            for actors in args.actors:
                out = root / "predictions" / f"{task}-{scale}x-{actors}"
                runs[actors] = run_child("predict", bundle, data, out, actors)
                print(json.dumps({"task": task, "scale": scale, "actors": actors, **runs[actors]}), flush=True)
            row = {"task": task, "scale": scale, "data": Path(data).name, "ceiling": ceil,
                   "runs": {str(a): r for a, r in runs.items()},
                   "ratio_steady": {str(a): round(r["steady_items_per_s"] / ceil["items_per_s"], 2)
                                    for a, r in runs.items()},
                   "measured": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count()}
            results[f"{task}-{scale}x"] = row
            RESULTS.mkdir(exist_ok=True)
            path.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "batch_inference.md").write_text(table(results))
    print(table(results))


def table(results: dict) -> str:
    head = ("| task | scale | items | ceiling items/s | actors | `medray predict` items/s (steady / whole job) "
            "| ratio to ceiling (steady) | driver peak RSS MB |\n|---|---|---|---|---|---|---|---|\n")
    body = ""
    for key in sorted(results, key=lambda k: (results[k]["task"], results[k]["scale"])):
        r = results[key]
        for a, run in sorted(r["runs"].items()):
            body += (f"| {r['task']} | {r['scale']}× | {run['rows']:,} | {r['ceiling']['items_per_s']:,.0f} | {a} | "
                     f"{run['steady_items_per_s']:,.0f} / {run['job_items_per_s']:,.0f} | "
                     f"**{r['ratio_steady'][a]}** | {run['peak_rss_mb']:,} |\n")
    return ("Ceiling: `Bundle.predict` on inputs already decoded in memory, one process. Command: "
            "`.venv/bin/python benchmarks/batch_inference.py`\n\n" + head + body)


if __name__ == "__main__":
    main()
