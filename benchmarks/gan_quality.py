"""The genomic GAN measured as an outside judge would: whole gene loci held out, the default recipe
trained on the rest exactly as a user runs it, and `medray evaluate` on the held-out loci.

1. Split `splice.csv` by locus (the id prefix before the first `-`, see SOURCE.md): a fraction of
   the loci (default 0.43, about as many sequences as the 959 held out elsewhere) goes to test.csv,
   the rest to train.csv; test sequences identical to a training sequence are dropped.
2. Train: `medray train genomic-gan --data train.csv --conditional --workers 2 --out BUNDLE`
   (a fresh storage folder, so nothing resumes), timed; with `--api`, `train_gan` in this
   process (the same job, any recipe option); or, with `--local`, the same training
   steps in this process (one process, the two workers' batches as one: a quick proxy for recipe
   sweeps, not for timing).
3. Evaluate: `medray evaluate BUNDLE --data test.csv` (the CLI's JSON), plus near-copies: the
   fraction of generated sequences within `--near` mismatches of a training sequence, beside the
   same fraction for held-out real sequences.

Prints one row (6-mer JS ratio to i.i.d. random, per-position base-frequency error vs random's,
EI GT donor rate, IE AG acceptor rate, copies, diversity, seconds; the JS ratio and position error
again with only as many generated sequences as the real half) and writes the JSON to
`results/gan_quality[-TAG].json`.

```bash
nice -n 10 python benchmarks/gan_quality.py                     # the default recipe through the CLI
nice -n 10 python benchmarks/gan_quality.py --local --set epochs=12 --tag e12   # a quick variant
```
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "genomic" / "splice.csv"


def split_by_locus(path: Path, fraction: float, seed: int, out: Path) -> tuple[Path, Path, dict]:
    rows = list(csv.DictReader(open(path)))
    loci = sorted({r["id"].split("-")[0] for r in rows})
    test_loci = set(np.random.default_rng(seed).choice(loci, int(round(fraction * len(loci))), replace=False))
    train = [r for r in rows if r["id"].split("-")[0] not in test_loci]
    seen = {r["sequence"] for r in train}
    test = [r for r in rows if r["id"].split("-")[0] in test_loci and r["sequence"] not in seen]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, part in (("train.csv", train), ("test.csv", test)):
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "sequence", "label"])
            w.writeheader()
            w.writerows({k: r[k] for k in ("id", "sequence", "label")} for r in part)
        paths.append(out / name)
    info = {"loci": len(loci), "test_loci": len(test_loci), "train": len(train), "test": len(test),
            "dropped_identical": sum(r["id"].split("-")[0] in test_loci for r in rows) - len(test)}
    return paths[0], paths[1], info


def parse_sets(items: list[str]) -> dict:
    """`key=value` (value as JSON when it parses; `generator.arch=conv` for a nested key)."""
    out: dict = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if "." in key:
            outer, inner = key.split(".", 1)
            out.setdefault(outer, {})[inner] = value
        else:
            out[key] = value
    return out


def train_cli(train: Path, bundle: Path, storage: Path, options: dict, workers: int) -> float:
    flags = {"epochs": "--epochs", "lr": "--lr", "n_critic": "--n-critic", "batch_size": "--batch-size"}
    extra = []
    for k, v in options.items():
        if k not in flags:
            raise SystemExit(f"--set {k}: not a `medray train` flag; use --local for other options")
        extra += [flags[k], str(v)]
    cmd = [sys.executable, "-m", "medray", "train", "genomic-gan", "--data", str(train), "--conditional",
           "--workers", str(workers), "--out", str(bundle), "--storage", str(storage), *extra]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    if r.returncode:
        sys.exit(f"training failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.time() - t0


def train_api(train: Path, bundle: Path, storage: Path, options: dict, workers: int) -> float:
    """`medray.gan.train_gan` in this process: the CLI's Ray Train job, with any recipe option."""
    from medray.gan import train_gan

    t0 = time.time()
    train_gan(str(train), str(bundle), workers=workers, storage=str(storage), conditional=True, **options)
    return time.time() - t0


def train_local(train: Path, bundle: Path, options: dict, workers: int, seed: int = 0,
                snapshots: tuple = ()) -> list[tuple[int, Path, float]]:
    """The worker loop's steps (medray.gan.GanSteps) in this process, one thread, batch = workers ×
    batch size; the bundle is written like train_gan's (EMA weights, sampling settings), also
    after each epoch in `snapshots` (as BUNDLE-eN). [(epoch, bundle, seconds)]."""
    import torch

    from medray.bundle import write_bundle
    from medray.data.genomic import read_genomic, sequence_hash
    from medray.gan import CRITIC, GENERATOR, RECIPE, TASK, GanSteps
    from medray.preprocessing import SequenceEncoder

    torch.set_num_threads(1)
    ds = read_genomic(str(train))
    length = 60
    keep = [i for i, s in enumerate(ds.inputs) if len(s) == length]
    seqs, labs = [ds.inputs[i] for i in keep], [str(ds.labels[i]) for i in keep]
    labels = sorted(set(labs))
    recipe = {**RECIPE, **{k: v for k, v in options.items() if k in RECIPE}}
    unknown = set(options) - set(RECIPE) - {"generator", "critic"}
    if unknown:
        raise SystemExit(f"unknown options {sorted(unknown)}")
    gen_params = {**GENERATOR, **options.get("generator", {}), "conditional": True}
    critic_params = {**CRITIC, **options.get("critic", {})}
    config = {"length": length, "labels": labels, "conditional": True, "generator": gen_params,
              "critic": critic_params, "seed": seed, **recipe, "batch_size": recipe["batch_size"] * workers}
    torch.manual_seed(seed)
    steps = GanSteps(config, torch.device("cpu"))
    xs = torch.as_tensor(SequenceEncoder(length).transform(seqs))
    ys = torch.as_tensor([labels.index(c) for c in labs])
    rng = torch.Generator()
    t0 = time.time()
    per = recipe["steps_per_epoch"]
    counts = np.array([labs.count(c) for c in labels], dtype=float)
    written, first = [], 1
    ckpt = bundle.with_name(f"{bundle.name}.ckpt.pt")  # resume after an interruption (same options)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["options"] == options:
            steps.load_state_dict(state)
            first, t0 = state["epoch"] + 1, time.time() - state["seconds"]
            written = state["written"]
            print(f"  resumed after epoch {state['epoch']}", flush=True)
    for epoch in range(first, recipe["epochs"] + 1):
        rng.manual_seed(seed * 1000 + 7919 * epoch)
        c, g, gp = steps.run(xs, ys, (epoch - 1) * per + 1, per, rng)
        print(f"  epoch {epoch}: critic {np.mean(c):.3f} generator {np.mean(g):.3f} gp {np.mean(gp):.3f} "
              f"{time.time() - t0:.0f}s", flush=True)
        if epoch in snapshots or epoch == recipe["epochs"]:
            seconds = time.time() - t0
            meta = {"name": bundle.name, "task": TASK, "model": {"name": "dna_generator", "params": gen_params},
                    "training": {**recipe, "critic": critic_params, "local": True, "epochs_trained": epoch,
                                 "seconds": round(seconds, 1)},
                    "preprocessing": SequenceEncoder(length).to_dict(), "labels": labels, "input_shape": [4, length],
                    "sampling": {"temperature": recipe["temperature"], "class_weights": list(counts / counts.sum())},
                    "training_hashes": sorted({sequence_hash(s) for s in seqs}), "metrics": {"history": []}}
            path = bundle if epoch == recipe["epochs"] else bundle.with_name(f"{bundle.name}-e{epoch}")
            write_bundle(path, steps.sampler().state_dict(), meta)
            written.append((epoch, path, seconds))
        torch.save({**steps.state_dict(), "epoch": epoch, "seconds": time.time() - t0, "options": options,
                    "written": written}, ckpt)
    return written


def near_copies(seqs: list[str], train: list[str], max_mismatch: int) -> float:
    """Fraction of `seqs` within `max_mismatch` mismatches of some training sequence."""
    from medray.preprocessing import SequenceEncoder

    enc = SequenceEncoder(60)
    t = enc.transform([s for s in train if len(s) == 60]).reshape(-1, 240)
    x = enc.transform([s for s in seqs if len(s) == 60]).reshape(-1, 240)
    best = (x @ t.T).max(axis=1)  # most positions equal to any training sequence
    return round(float(np.mean(60 - best <= max_mismatch)), 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--holdout", type=float, default=0.43, help="fraction of loci held out (default 0.43)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--local", action="store_true", help="train in this process (quick recipe sweeps)")
    p.add_argument("--api", action="store_true", help="train with medray.gan.train_gan in this process (Ray "
                   "Train as the CLI runs it; any --set option)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override (only the CLI's flags without --local or --api)")
    p.add_argument("--bundle", help="evaluate this bundle instead of training one")
    p.add_argument("--n", type=int, help="evaluate --n (default: the CLI's)")
    p.add_argument("--near", type=int, default=3, help="near-copy threshold in mismatches (default 3)")
    p.add_argument("--snapshots", default="", help="--local: also evaluate after these epochs (e.g. 12,24)")
    p.add_argument("--tag", default="")
    p.add_argument("--workdir", help="keep the split and bundle here (default: a temporary folder)")
    args = p.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gan-quality-"))
    train, test, split = split_by_locus(Path(args.data), args.holdout, args.split_seed, work / "split")
    print(f"split: {split}  ({work})", flush=True)
    options = parse_sets(args.set)
    bundle = Path(args.bundle) if args.bundle else work / "bundle"
    runs = [(None, bundle, None)]
    if not args.bundle:
        if args.local:
            runs = train_local(train, bundle, options, args.workers,
                               snapshots=tuple(int(e) for e in args.snapshots.split(",") if e))
        elif args.api:
            runs = [(None, bundle, train_api(train, bundle, work / "runs", options, args.workers))]
        else:
            runs = [(None, bundle, train_cli(train, bundle, work / "runs", options, args.workers))]
    for epoch, path, seconds in runs:
        tag = (args.tag or "default") + (f"-e{epoch}" if epoch and len(runs) > 1 else "")
        evaluate(path, train, test, split, options, tag, seconds, args)


def evaluate(bundle: Path, train: Path, test: Path, split: dict, options: dict, tag: str, seconds, args) -> None:
    cmd = [sys.executable, "-m", "medray", "evaluate", str(bundle), "--data", str(test)]
    cmd += ["--n", str(args.n)] if args.n else []
    r = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    if r.returncode:
        sys.exit(f"evaluate failed:\n{r.stderr[-3000:]}")
    report = json.loads(r.stdout)

    from medray.bundle import load_bundle
    from medray.gan import evaluate_gan, generate

    # the same figures with as many generated sequences as the real half (the noisier, older default)
    small = evaluate_gan(load_bundle(bundle), str(test), n=report["n_second_real"])["summary"]

    train_seqs = [row["sequence"] for row in csv.DictReader(open(train))]
    test_seqs = [row["sequence"] for row in csv.DictReader(open(test))]
    gen, _ = generate(load_bundle(bundle), 1000, seed=5)
    report["near_copies"] = {"max_mismatch": args.near, "generated": near_copies(gen, train_seqs, args.near),
                             "held_out_real": near_copies(test_seqs, train_seqs, args.near)}
    s = report["summary"]
    row = {
        "tag": tag, "local": args.local, "options": options,
        "js6_ratio": s["kmer6_js"]["generated_to_random"], "js6": s["kmer6_js"]["generated"],
        "js6_random": s["kmer6_js"]["random"], "js6_second_real": s["kmer6_js"]["second_real"],
        "posfreq": s["position_freq_mae"]["generated"], "posfreq_random": s["position_freq_mae"]["random"],
        "EI_GT": s.get("EI_GT_after_centre (donor)", {}).get("generated"),
        "IE_AG": s.get("IE_AG_before_centre (acceptor)", {}).get("generated"),
        "copies": s["copies_of_training"], "near_copies": report["near_copies"]["generated"],
        "near_copies_real": report["near_copies"]["held_out_real"],
        "unique": s["diversity"]["generated"]["unique_fraction"],
        "pairwise": s["diversity"]["generated"]["mean_pairwise_distance"],
        "pairwise_real": s["diversity"]["second_real"]["mean_pairwise_distance"],
        "seconds": None if seconds is None else round(seconds, 1),
        "n_generated": report["n_generated"], "n_small": report["n_second_real"],
        "js6_ratio_small_n": small["kmer6_js"]["generated_to_random"],
        "posfreq_small_n": small["position_freq_mae"]["generated"],
        "posfreq_random_small_n": small["position_freq_mae"]["random"],
    }
    print(json.dumps(row))
    print(f"| {row['tag']} | {row['js6_ratio']:.3f} ({row['js6']:.4f} vs {row['js6_random']:.4f}; real "
          f"{row['js6_second_real']:.4f}) | {row['posfreq']:.4f} vs {row['posfreq_random']:.4f} | {row['EI_GT']} | "
          f"{row['IE_AG']} | {row['copies']} (near {row['near_copies']}, real {row['near_copies_real']}) | "
          f"{row['unique']} / {row['pairwise']} (real {row['pairwise_real']}) | {row['seconds']} | "
          f"n={row['n_small']}: {row['js6_ratio_small_n']:.3f}, {row['posfreq_small_n']:.4f} vs "
          f"{row['posfreq_random_small_n']:.4f} |", flush=True)
    out = ROOT / "benchmarks" / "results" / f"gan_quality{'-' + tag if tag != 'default' else ''}.json"
    out.write_text(json.dumps({"row": row, "split": split, "report": report,
                               "command": " ".join(["python", *sys.argv])}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
