"""`medray demo`: synthetic data for all three tasks → train (2 workers each) → evaluate → table;
then a conditional genomic GAN on the synthetic DNA, measured against real and random sequences."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from medray.bundle import load_bundle
from medray.console import say
from medray.gan import evaluate_gan, train_gan
from medray.inference import evaluate_file
from medray.models import describe
from medray.synthetic import write_demo_data
from medray.train import train

# Fewer epochs than the presets (which are tuned for real data) keep the demo within minutes.
DEMO_EPOCHS = {"exercise": 10, "ultrasound": 16, "genomic": 8}
# The demo's data sets are small (tens of rows per worker): small batches give enough optimiser steps.
DEMO_BATCH = {"exercise": 16, "ultrasound": 8, "genomic": 32}
GAN_EPOCHS = 4  # × 500 critic steps, the short recipe (n_critic 2, lr 3e-4): about a minute
GROUPS = {"exercise": "subject", "ultrasound": None, "genomic": None}
# Quick mode (the tests) trains one ultrasound model instead of the preset's three; the exercise
# default (also an ensemble of 3, and cheap) still trains every member.
QUICK_OVERRIDES = {"ultrasound": {"ensemble": 1}}


def run_demo(workdir: str = ".medray-demo", workers: int = 2, quick: bool = False) -> list[dict]:
    root = Path(workdir).absolute()
    t0 = time.time()
    paths = write_demo_data(root / "data", scale=0.6 if quick else 1.0)
    say(f"[medray] demo data written under {root / 'data'} ({time.time() - t0:.1f}s)")
    rows = []
    for task, (train_path, test_path) in paths.items():
        started = time.time()
        meta = train(task, str(train_path), str(root / "bundles" / task), epochs=DEMO_EPOCHS[task],
                     batch_size=DEMO_BATCH.get(task), workers=workers, storage=str(root / "runs"),
                     name=f"demo-{task}-{'quick' if quick else 'full'}", group_column=GROUPS[task],
                     label=f"demo {task}", overrides=QUICK_OVERRIDES.get(task) if quick else None)
        test = evaluate_file(load_bundle(root / "bundles" / task), str(test_path))
        rows.append({"task": task, "model": describe(meta["model"]), "train_rows": meta["data"]["train_rows"],
                     "val_accuracy": meta["metrics"]["validation"]["accuracy"], "test_n": test["n"],
                     "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
                     "seconds": round(time.time() - started, 1)})
    started = time.time()  # the genomic GAN, conditional on the demo's EI / IE / N classes
    gan_dir = root / "bundles" / "genomic-gan"
    train_gan(str(paths["genomic"][0]), str(gan_dir), epochs=GAN_EPOCHS, n_critic=2, lr=3e-4, workers=workers,
              storage=str(root / "runs"), name=f"demo-genomic-gan-{'quick' if quick else 'full'}", conditional=True,
              label="demo genomic-gan")
    gan = evaluate_gan(load_bundle(gan_dir), str(paths["genomic"][1]), seed=1)
    say("")
    header = f"{'task':<11}{'model':<9}{'train':>7}{'val acc':>9}{'test n':>8}{'test acc':>10}{'test F1':>9}{'sec':>7}"
    say(header)
    say("-" * len(header))
    for r in rows:
        say(f"{r['task']:<11}{r['model']:<9}{r['train_rows']:>7}{r['val_accuracy']:>9.3f}{r['test_n']:>8}"
              f"{r['test_accuracy']:>10.3f}{r['test_macro_f1']:>9.3f}{r['seconds']:>7.1f}")
    say(f"\ngenomic-gan: 4-mer Jensen-Shannon distance to held-out real DNA: generated "
          f"{gan['generated']['kmer_js_k4']:.3f}, random baseline {gan['random_baseline']['kmer_js_k4']:.3f}, "
          f"second real sample {gan['second_real_sample']['kmer_js_k4']:.3f}  ({time.time() - started:.0f}s)")
    say(f"\nbundles: {root / 'bundles'}  (try: medray predict {root / 'bundles' / 'genomic'} "
          f"--data {paths['genomic'][1]})   total {time.time() - t0:.0f}s")
    say(f"plots and model cards: {root / 'bundles'}/<task>/report/ (model_card.md, curves.png, "
          f"confusion_matrix.png, roc.png, calibration.png)")
    tokens = write_demo_token(root / "tokens")
    say(f"API token for serving the demo bundles (serve/config.yaml reads it): {tokens}")
    return rows


def write_demo_token(path: Path) -> Path:
    """A tokens file with one random token (all models), readable by its owner only; kept if present."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"# medray demo token (all models). Send it as: Authorization: Bearer <token>\n"
                    f"{secrets.token_urlsafe(32)}\n")
    return path
