"""Training throughput: `medray train` (Ray Train, 2 workers, data on Ray Data) against the plain
single-process loop (same model, recipe and batch size, data already in memory), for each task at
1×, 10× and 100× the public data (synthetic data written in the users' formats by medray's own
generator: PNG class folders, FASTA, CSV/Parquet).

    .venv/bin/python benchmarks/training.py                       # every task, 1× 10× 100×
    .venv/bin/python benchmarks/training.py --tasks genomic --scales 1 10

Each run is its own process, as a user starts it (a fresh local Ray instance for medray), so
driver peak RSS and whole-job wall time are what a user sees. Steady samples/s: training rows per
second over the last epoch (Ray: the slowest worker's training time, less the wait for the first
batch; plain: the same, measured in-loop). The plain loop runs just before and just after the Ray
run and its rate is the mean of the two: this machine's speed drifts by 10-20 % within minutes, which
one plain run after Ray turned into ratio swings of that size. Data wait: share of the training
steps' time the Ray workers waited for a batch. Results: benchmarks/results/training.json and training.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PUBLIC_ROWS = {"exercise": 1578, "ultrasound": 552, "genomic": 2231}
EPOCHS = {1: None, 10: 2, 100: 1}  # None: the preset's epochs (the whole run a user makes on the public data)
RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------- data
def make_data(task: str, scale: int, root: Path) -> tuple[str, str | None]:
    """(data path, group column) of `task` at `scale`× the public data, written once under root."""
    from PIL import Image

    from medray.synthetic import EXERCISES, dna_sequence, exercise_table, ultrasound_image

    n = PUBLIC_ROWS[task] * scale
    rng = np.random.default_rng(scale)
    root.mkdir(parents=True, exist_ok=True)
    if task == "ultrasound":
        out = root / f"ultrasound-{scale}x"
        if not (out / ".done").exists():
            for k, kind in enumerate(("normal", "benign", "malignant")):
                (out / kind).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                kind = ("benign", "malignant", "normal")[0 if i % 16 < 9 else 1 if i % 16 < 13 else 2]
                Image.fromarray(ultrasound_image(kind, rng)).save(out / kind / f"{i:07d}.png")
            (out / ".done").touch()
        return str(out), None
    if task == "genomic":
        out = root / f"genomic-{scale}x.fasta"
        if not out.exists():
            tmp = out.with_suffix(".partial")
            with open(tmp, "w") as f:
                for i in range(n):
                    kind = ("EI", "IE", "N", "N")[i % 4]
                    f.write(f">LOCUS{i // 20}-{kind}-{i} label={kind}\n{dna_sequence(kind, rng)}\n")
            tmp.rename(out)
        return str(out), "id-prefix"
    out = root / (f"exercise-{scale}x.parquet" if scale >= 100 else f"exercise-{scale}x.csv")
    if not out.exists():
        subjects = 8
        df = exercise_table(n_subjects=subjects, windows_per_class=-(-n // (subjects * len(EXERCISES))),
                            seed=scale)
        df = df.iloc[:n]
        tmp = out.with_name(".partial-" + out.name)
        df.to_parquet(tmp, index=False) if out.suffix == ".parquet" else df.to_csv(tmp, index=False)
        tmp.rename(out)
    return str(out), "subject"


# ----------------------------------------------------------------------------- the two runs (subprocesses)
def run_ray(task, data, group, epochs, workdir) -> dict:
    from medray.train import train

    t0 = time.time()
    meta = train(task, data, str(workdir / "bundle"), epochs=epochs, workers=2, storage=str(workdir / "runs"),
                 name=f"bench-{int(t0)}", group_column=group, log=lambda *a: None)
    wall = time.time() - t0
    hist = meta["metrics"]["history"]
    last = hist[-1]
    rows = sum(last["rows_per_worker"])
    steady_s = last["train_seconds"] - (last["first_step_s"] if len(hist) == 1 else 0.0)
    per_step_rows = rows / max(1, last["steps"])
    steady_rows = rows - (per_step_rows * 2 if len(hist) == 1 else 0)  # the first step's batch, both workers
    return {"rows": meta["data"]["rows"], "wall_s": round(wall, 1),
            "first_step_s": round(hist[0]["started_at"] + hist[0]["first_step_s"] - t0, 1),
            "samples_per_s": round(steady_rows / max(steady_s, 1e-9), 1),
            "data_wait_share": _steady_wait(hist),
            "epochs": len(hist), "epoch_s": [h["seconds"] for h in hist][-3:],
            "step_s": last.get("step_s"),  # per worker: p50, p90, p99, max of the last epoch's steps
            "val_accuracy": meta["metrics"]["validation"]["accuracy"],
            "phases": {**meta["training"].get("phases", {}), "trainer_s": meta["training"]["seconds"]}}


def _steady_wait(hist: list[dict]) -> float:
    """Share of steady training time spent waiting for data: epochs after the first (whose wait
    includes reading a cached shard); with one epoch, that epoch after its first batch."""
    if len(hist) > 1:
        return max(h["data_wait_share"] for h in hist[1:])
    h = hist[0]
    wait = h["data_wait_share"] * h["train_seconds"] - h["first_step_s"]
    return round(max(0.0, wait) / max(h["train_seconds"] - h["first_step_s"], 1e-9), 4)


def run_plain(task, data, group, epochs, workdir) -> dict:
    """The loop a user writes without Ray: read everything in-process, then train on arrays."""
    import torch

    from medray.augment import augment_batch, mix
    from medray.models import build_model, preset_arch
    from medray.split import resolve_groups, split_indices
    from medray.tasks import encode_labels, load_preset, read_training_data
    from medray.train import step_quantiles

    t0 = time.time()
    preset = load_preset(task)
    recipe = preset["train"]
    epochs = epochs or recipe["epochs"]
    ds = read_training_data(task, data, preset=preset, exclude=(group,) if group and group != "id-prefix" else ())
    labels = sorted(set(ds.labels.tolist()))
    y = encode_labels(ds.labels, labels, data)
    tr, va = split_indices(ds.labels, resolve_groups(group, ds), 0.2, 0)
    from medray.preprocessing import ImageNormalizer, SequenceEncoder, StandardScaler

    train_ds = ds.take(tr)
    if task == "exercise":
        prep = StandardScaler.fit(train_ds.inputs, ds.meta["feature_names"], **preset["preprocessing"])
    elif task == "ultrasound":
        prep = ImageNormalizer.fit(train_ds.inputs, size=preset["preprocessing"]["size"])
    else:
        prep = SequenceEncoder.fit(train_ds.inputs)
    x_tr = torch.from_numpy(prep.transform(train_ds.inputs))
    x_va = torch.from_numpy(prep.transform(ds.take(va).inputs))
    y_tr, y_va = torch.from_numpy(y[tr]), torch.from_numpy(y[va])
    del ds, train_ds
    torch.manual_seed(0)
    model = build_model(preset_arch(preset), prep.input_shape, len(labels))  # the model medray trains
    members = int(preset.get("ensemble", 1))  # an ensemble's members train side by side, one loss each
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe.get("weight_decay", 0.0))
    bs = recipe["batch_size"]
    steps = epochs * -(-len(y_tr) // bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    t_first, rate = None, 0.0
    for epoch in range(epochs):
        step_s = []
        model.train()
        order = torch.randperm(len(y_tr), generator=gen)
        t_e, n_rows = None, 0
        for k, lo in enumerate(range(0, len(y_tr), bs)):
            t_step = time.perf_counter()
            idx = order[lo: lo + bs]
            xb = augment_batch(x_tr[idx], recipe.get("augment") or {}, prep.input_shape, gen)
            yb, y2, lam = y_tr[idx], y_tr[idx], 1.0
            if recipe.get("mixup"):  # as medray's training step does
                xb, yb, y2, lam = mix(xb, yb, recipe["mixup"], gen)
            logits = model(xb, members=True) if members > 1 else model(xb)[None]
            loss = torch.stack([lam * loss_fn(z, yb) + (1 - lam) * loss_fn(z, y2) for z in logits]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step_s.append(time.perf_counter() - t_step)
            if t_first is None:
                t_first = time.time() - t0
            if k == 0:
                t_e = time.time()  # steady state: from the end of the epoch's first step
            else:
                n_rows += len(idx)
        rate = n_rows / max(time.time() - t_e, 1e-9)
        model.eval()
        with torch.inference_mode():
            correct = sum(int((model(x_va[i: i + 256]).argmax(1) == y_va[i: i + 256]).sum())
                          for i in range(0, len(y_va), 256))
    return {"wall_s": round(time.time() - t0, 1), "first_step_s": round(t_first, 1), "samples_per_s": round(rate, 1),
            "val_accuracy": correct / max(1, len(y_va)), "step_s": step_quantiles(step_s)}


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that over fork and
    exec, so a child would report its parent's peak."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(kind, task, data, group, epochs, workdir):
    out = (run_ray if kind == "ray" else run_plain)(task, data, group, epochs, Path(workdir))
    out["peak_rss_mb"] = round(peak_rss_mb())
    print("RESULT " + json.dumps(out), flush=True)


def measure(kind, task, data, group, epochs, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--child", kind, task, data, group or "-", str(epochs or 0), str(workdir)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not lines:
        raise SystemExit(f"{kind} {task} failed:\n{r.stderr[-4000:]}")
    return json.loads(lines[-1][7:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["genomic", "exercise", "ultrasound"])
    ap.add_argument("--scales", nargs="+", type=int, default=[1, 10, 100])
    ap.add_argument("--workdir", default=os.environ.get("MEDRAY_BENCH_DIR", "/tmp/medray-bench"))
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, task, data, group, epochs, workdir = args.child
        return _child(kind, task, data, None if group == "-" else group, int(epochs) or None, workdir)
    root = Path(args.workdir)
    results = json.loads((RESULTS / "training.json").read_text()) if (RESULTS / "training.json").exists() else {}
    for task in args.tasks:
        for scale in args.scales:
            data, group = make_data(task, scale, root / "data")
            epochs = EPOCHS.get(scale, 1)
            # plain, Ray, plain: this machine's speed drifts by 10-20 % within minutes, so Ray's rate is
            # compared with the mean of the plain loop's just before and just after it
            plain = measure("plain", task, data, group, epochs, root / "runs" / f"{task}-{scale}x-plain")
            ray_r = measure("ray", task, data, group, epochs, root / "runs" / f"{task}-{scale}x-ray")
            after = measure("plain", task, data, group, epochs, root / "runs" / f"{task}-{scale}x-plain")
            plain["samples_per_s_runs"] = [plain["samples_per_s"], after["samples_per_s"]]
            plain["samples_per_s"] = round((plain["samples_per_s"] + after["samples_per_s"]) / 2, 1)
            row = {"task": task, "scale": scale, "data": Path(data).name, "epochs": ray_r["epochs"], "ray": ray_r,
                   "plain": plain, "ratio": round(ray_r["samples_per_s"] / plain["samples_per_s"], 2),
                   "measured": time.strftime("%Y-%m-%d %H:%M")}
            results[f"{task}-{scale}x"] = row
            print(json.dumps(row), flush=True)
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / "training.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "training.md").write_text(table(results))
    print(table(results))


def table(results: dict) -> str:
    head = ("| task | scale | rows | epochs | driver peak RSS (MB) | s to first step (Ray / plain) | steady samples/s "
            "Ray Train | plain loop | ratio | whole job s (Ray / plain) | data wait |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for key in sorted(results, key=lambda k: (results[k]["task"], results[k]["scale"])):
        r = results[key]
        a, b = r["ray"], r["plain"]
        body += (f"| {r['task']} | {r['scale']}× | {a['rows']:,} | {r['epochs']} | {a['peak_rss_mb']:,} / "
                 f"{b['peak_rss_mb']:,} | {a['first_step_s']} / {b['first_step_s']} | {a['samples_per_s']:,.0f} | "
                 f"{_plain_rate(b)} | **{r['ratio']}** | {a['wall_s']} / {b['wall_s']} | "
                 f"{a['data_wait_share'] * 100:.1f} % |\n")
    return ("Driver peak RSS: `medray train` / the plain loop (which holds every row). Plain loop's samples/s: "
            "the mean of its runs just before and just after the Ray run (both in brackets; rows without "
            "brackets ran it once, after). Command: `.venv/bin/python benchmarks/training.py`\n\n" + head + body)


def _plain_rate(b: dict) -> str:
    runs = b.get("samples_per_s_runs")
    return f"{b['samples_per_s']:,.0f}" + (f" ({runs[0]:,.0f} / {runs[1]:,.0f})" if runs else "")


if __name__ == "__main__":
    main()
