"""Post-hoc test-time augmentation check on kept CV bundles (`model_selection.py --keep-bundles DIR`):
each fold's bundle predicts its own validation rows plain and as the mean of (image, hflip(image))
probabilities; prints per-fold and mean ± sd accuracy / balanced accuracy / ECE (temperature of the
bundle, fitted without TTA: the ECE with TTA is therefore conservative).

    .venv/bin/python benchmarks/tta_check.py runs/us-bundles/ultrasound___convnet_...
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "ultrasound"


def main(folder: str) -> int:
    from medray.bundle import load_bundle
    from medray.data.ultrasound import load_image
    from medray.metrics import classification_metrics
    from medray.split import split_indices

    labels_csv = pd.read_csv(DATA / "labels.csv")
    groups = pd.read_csv(DATA / "manifest.csv")["dup_group"].astype(str).to_numpy()
    rows = {"plain": [], "hflip TTA": []}
    for b in sorted(Path(folder).glob("seed*-fold*")):
        bundle = load_bundle(b)
        split = bundle.meta["data"]["split"]
        _, va = split_indices(labels_csv["label"].to_numpy(), groups, 0.2, split["seed"],
                              fold=(split["folds"], split["fold"]))
        size = bundle.meta["preprocessing"].get("size", 128)
        imgs = [load_image(str(DATA / p), size) for p in labels_csv["path"].iloc[va]]
        x = bundle.preprocessor.transform(np.stack(imgs))
        y = np.array([bundle.labels.index(v) for v in labels_csv["label"].iloc[va]])
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x))
            logits = bundle.model(t).float()
            logits_f = bundle.model(t.flip(-1)).float()
        T = bundle.temperature
        p = torch.softmax(logits / T, 1).numpy()
        p_tta = (p + torch.softmax(logits_f / T, 1).numpy()) / 2
        assert len(va) == bundle.meta["data"]["val_rows"], "validation rows differ from the fold's"
        for name, probs in (("plain", p), ("hflip TTA", p_tta)):
            m = classification_metrics(y, probs, bundle.labels)
            rows[name].append([m["accuracy"], m["balanced_accuracy"], m["ece"]])
        print(b.name, "plain", np.round(rows["plain"][-1], 3), "tta", np.round(rows["hflip TTA"][-1], 3), flush=True)
    for name, v in rows.items():
        v = np.array(v)
        print(f"{name:10s} accuracy {v[:, 0].mean():.3f} ± {v[:, 0].std(ddof=1):.3f}  balanced {v[:, 1].mean():.3f}  "
              f"ECE (calibrated on plain) {v[:, 2].mean():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
