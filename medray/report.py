"""What a person reads about a model: plots and a model card (matplotlib, Agg backend).

`write_report(folder, …)` writes:
- `curves.png`: training/validation loss and validation accuracy per epoch (bundles only);
- `confusion_matrix.png`: counts, rows = true class;
- `roc.png`: one-vs-rest ROC curve per class, with its AUROC;
- `calibration.png`: reliability diagram (accuracy against confidence, 15 bins) with the ECE;
- `model_card.md`: task, data and split, model, recipe, metrics and how to reproduce them,
  calibration, intended use and limits, versions, linking the pictures.

Training writes it into every bundle (`BUNDLE/report/`, inside the bundle's atomic write) from
the final validation predictions; `medray evaluate BUNDLE --data D --report DIR` writes the same
set for any labelled data.

A GAN bundle's report (`write_gan_report`) holds `curves.png` (critic/generator loss and 4-mer
JS per epoch), `kmers.png` (3-mer spectrum of generated vs real sequences, beside i.i.d. random
ones), `positions.png` (base frequency per position, generated vs real) and its `model_card.md`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medray.metrics import classification_metrics
from medray.models import describe

PICTURES = ("curves.png", "confusion_matrix.png", "roc.png", "calibration.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], path: Path) -> None:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker=".", label="training")
    ax1.plot(epochs, [h["val_loss"] for h in history], marker=".", label="validation")
    ax1.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax1.legend()
    for key, label in (("val_accuracy", "accuracy"), ("val_balanced_accuracy", "balanced accuracy"),
                       ("val_macro_f1", "macro F1")):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax2.plot(epochs, [np.nan if v is None else v for v in values], marker=".", label=label)
    ax2.set(xlabel="epoch", ylabel="validation", title="Validation metrics", ylim=(0, 1.02))
    ax2.legend()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(metrics: dict, path: Path) -> None:
    plt = _pyplot()
    cm, labels = np.array(metrics["confusion_matrix"]), metrics["labels"]
    size = 2.2 + 0.9 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels,
           xlabel="predicted", ylabel="true", title=f"Confusion matrix (n = {cm.sum()}, "
           f"accuracy {metrics['accuracy']:.3f})")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(y: np.ndarray, probs: np.ndarray, labels: list[str], path: Path) -> None:
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c, name in enumerate(labels):
        truth = y == c
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, probs[:, c])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(truth, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
           title="ROC, one class against the rest", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_calibration(metrics: dict, path: Path) -> None:
    plt = _pyplot()
    table = metrics["reliability"]
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    centers = [(r["lower"] + r["upper"]) / 2 for r in table]
    width = table[0]["upper"] - table[0]["lower"] if table else 1 / 15
    ax.bar(centers, [r["accuracy"] for r in table], width=width * 0.9, alpha=0.7, label="accuracy in bin")
    ax.plot([r["confidence"] for r in table], [r["accuracy"] for r in table], "o", color="C1",
            label="(mean confidence, accuracy)")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    ax.set(ylabel="accuracy", title=f"Reliability diagram (ECE {metrics['ece']:.3f}, 15 bins)", ylim=(0, 1.02))
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    hist.bar(centers, [r["count"] for r in table], width=width * 0.9, color="grey")
    hist.set(xlabel="confidence of the predicted class", ylabel="rows", xlim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def model_card(meta: dict, metrics: dict, *, evaluated_on: str | None = None, pictures=PICTURES) -> str:
    """Markdown: what the model is, what it was trained and judged on, how well, and its limits."""
    tr, data, cal = meta.get("training", {}), meta.get("data", {}), meta.get("calibration") or {}
    split = data.get("split", {})
    how = (f"grouped by `{split['group_column']}` (no group on both sides)" if split.get("group_column")
           else "stratified by label")
    part = (f"fold {split['fold'] + 1} of {split['folds']}" if split.get("folds")
            else f"{int(round((split.get('val_fraction') or 0.2) * 100))} % held out")
    lines = [
        f"# Model card: {meta.get('name', '')} ({meta['task']})", "",
        f"- **Model**: `{describe(meta['model'])}` {meta['model'].get('params', {})}, "
        f"{len(meta['labels'])} classes: {', '.join(meta['labels'])}",
        f"- **Input**: {meta.get('input', {})}",
        f"- **Preprocessing** (fitted on the training rows only): `{meta['preprocessing'].get('kind', '')}`",
    ]
    if data:
        lines += [
            f"- **Data**: `{data.get('source')}`: {data.get('rows')} rows, train {data.get('train_rows')} / "
            f"validation {data.get('val_rows')} ({part}, {how}, seed {split.get('seed')}); "
            f"training class counts {data.get('class_counts_train')}",
        ]
        if data.get("skipped"):
            lines.append(f"- **Left out as unreadable**: {data['skipped'].get('count')} items (`--skip-bad`)")
    if tr:
        lines.append(f"- **Recipe**: {tr.get('epochs')} epochs, batch {tr.get('batch_size')}, {tr.get('optimizer')} "
                     f"lr {tr.get('lr')}, weight decay {tr.get('weight_decay')}, {tr.get('schedule')}, class weights "
                     f"{tr.get('class_weights')}, augmentation {tr.get('augment') or 'none'}"
                     f"{', mixup ' + str(tr['mixup']) if tr.get('mixup') else ''}; {tr.get('workers')} "
                     f"Ray Train worker(s) on {'GPU' if tr.get('gpu') else 'CPU'}, {tr.get('seconds')} s")
    source = evaluated_on or "the validation rows above"
    lines += ["", f"## Metrics on {source}", "",
              "| n | accuracy | balanced accuracy | macro F1 | AUROC | ECE |", "|---|---|---|---|---|---|",
              f"| {metrics['n']} | {_fmt(metrics['accuracy'])} | {_fmt(metrics['balanced_accuracy'])} | "
              f"{_fmt(metrics['macro_f1'])} | {_fmt(metrics['auroc'])} | {_fmt(metrics['ece'])} |", "",
              "| class | support | sensitivity | specificity |", "|---|---|---|---|"]
    for name, pc in metrics["per_class"].items():
        lines.append(f"| {name} | {pc['support']} | {_fmt(pc['sensitivity'])} | {_fmt(pc['specificity'])} |")
    lines += ["", "Reproduce: `medray evaluate BUNDLE --data DATA --report DIR` (these figures for any labelled data)."]
    if cal:
        lines += ["", "## Calibration", "",
                  f"Probabilities are temperature-scaled (T = {cal['temperature']:.3f}, fitted on the {cal['n']} "
                  f"validation rows). ECE before: {_fmt(cal.get('ece_uncalibrated'))}; after, on the rows it was "
                  f"fitted on: {_fmt(cal.get('ece_calibrated'))}; cross-fitted (fitted on half, judged on the other "
                  f"half): {_fmt(cal.get('ece_crossfit'))}."]
    lines += ["", "## Pictures", ""]
    lines += [f"![{p[:-4]}]({p})" for p in pictures]
    lines += ["", "## Intended use and limits", "",
              "- Research and decision support evaluated by the deploying team; not a medical device and not "
              "cleared for diagnosis. A clinician reviews every output.",
              "- The figures hold for data like the training data (same devices, protocols and population). "
              "Validate on local data (`medray evaluate`) before use, and again when equipment or population "
              "change; watch the served label counts for drift.",
              "- A single validation split of a few hundred rows varies by several points; `medray cv` gives "
              "mean ± sd over grouped folds.",
              "", "## Versions", "", f"{meta.get('versions', {})}, bundle weights "
              f"`{meta.get('weights', {}).get('sha256', '')[:12]}`", ""]
    return "\n".join(lines)


def write_report(folder: str | Path, meta: dict, y: np.ndarray, probs: np.ndarray, *, history=None,
                 evaluated_on: str | None = None) -> Path:
    """The pictures and model card for predictions `probs` (N, K) of true classes `y` (indices)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    y, probs = np.asarray(y, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    metrics = classification_metrics(y, probs, meta["labels"])
    pictures = [p for p in PICTURES if history or p != "curves.png"]  # curves: a bundle's training history
    if history:
        plot_curves(history, folder / "curves.png")
    plot_confusion(metrics, folder / "confusion_matrix.png")
    plot_roc(y, probs, meta["labels"], folder / "roc.png")
    plot_calibration(metrics, folder / "calibration.png")
    (folder / "model_card.md").write_text(model_card(meta, metrics, evaluated_on=evaluated_on, pictures=pictures))
    return folder


GAN_PICTURES = ("curves.png", "kmers.png", "positions.png")


def write_gan_report(folder: str | Path, meta: dict, generated: list[str], real: list[str], random: list[str],
                     comparison: dict) -> Path:
    """Pictures and card of a DNA generator: `generated`, `real` and i.i.d. `random` sequences of the
    generator's length; `comparison`: `medray.gan.compare` figures keyed generated/random_baseline."""
    from medray.data.genomic import BASES
    from medray.gan import kmer_spectrum, position_frequencies

    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    history, length = meta["metrics"]["history"], meta["input_shape"][1]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["critic_loss"] for h in history], marker=".", label="critic")
    ax1.plot(epochs, [h["generator_loss"] for h in history], marker=".", label="generator")
    ax1.set(xlabel="epoch", ylabel="WGAN-GP loss", title="Losses")
    ax1.legend()
    ax2.plot(epochs, [h.get("kmer4_js", np.nan) for h in history], marker=".", color="C2")
    ax2.set(xlabel="epoch", ylabel="JS divergence (bits)", title="4-mer JS, 512 samples vs training data")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "curves.png", dpi=110)
    plt.close(fig)

    real3 = kmer_spectrum(real, 3)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    top = max(real3.max(), kmer_spectrum(generated, 3).max()) * 1.05
    for seqs, name, color in ((random, "i.i.d. random", "grey"), (generated, "generated", "C0")):
        key = "random_baseline" if name.startswith("i.i.d") else "generated"
        ax.scatter(real3, kmer_spectrum(seqs, 3), s=14, alpha=0.8, color=color,
                   label=f"{name} (3-mer JS {comparison[key]['kmer_js_k3']:.4f}, "
                         f"6-mer {comparison[key]['kmer_js_k6']:.3f})")
    ax.plot([0, top], [0, top], color="black", linestyle="--", linewidth=1)
    ax.set(xlabel="frequency in real sequences", ylabel="frequency in the sample", xlim=(0, top), ylim=(0, top),
           title="3-mer spectrum (64 k-mers)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "kmers.png", dpi=110)
    plt.close(fig)

    fr, fg = position_frequencies(real, length), position_frequencies(generated, length)
    fig, ax = plt.subplots(figsize=(10, 4))
    for b, base in enumerate(BASES):
        ax.plot(range(1, length + 1), fr[:, b], color=f"C{b}", label=f"{base} real")
        ax.plot(range(1, length + 1), fg[:, b], color=f"C{b}", linestyle="--", label=f"{base} generated")
    ax.set(xlabel="position", ylabel="base frequency", ylim=(0, 1), title="Base frequency per position "
           f"(mean absolute error {comparison['generated']['position_freq_mae']:.4f}, random "
           f"{comparison['random_baseline']['position_freq_mae']:.4f})")
    ax.legend(ncol=4, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "positions.png", dpi=110)
    plt.close(fig)

    g, r = comparison["generated"], comparison["random_baseline"]
    tr = meta.get("training", {})
    rows = [f"| {k} | {g[k]} | {r[k]} |" for k in g]
    card = "\n".join([
        f"# Model card: {meta.get('name', '')} (DNA generator)", "",
        f"- **Model**: WGAN-GP, generator {meta['model'].get('params', {})}; sequences of length {length}"
        + (f", conditional on {', '.join(meta['labels'])}" if meta.get("labels") else ""),
        f"- **Data**: `{meta.get('data', {}).get('source')}`, {meta.get('data', {}).get('sequences')} sequences",
        f"- **Recipe**: {tr.get('epochs')} epochs × {tr.get('steps_per_epoch')} critic steps, batch "
        f"{tr.get('batch_size')}, lr {tr.get('lr')}, n_critic {tr.get('n_critic')}; {tr.get('workers')} worker(s), "
        f"{tr.get('seconds')} s", "",
        f"## Generated vs real ({len(generated)} generated, {len(real)} real training sequences)", "",
        "| figure | generated | i.i.d. random (real base composition) |", "|---|---|---|", *rows, "",
        "k-mer JS: Jensen-Shannon divergence of k-mer spectra, in bits (0 = same). Judge on sequences held out "
        "from training: `medray evaluate BUNDLE --data HELD_OUT.fasta`.", "",
        "## Pictures", "", *[f"![{p[:-4]}]({p})" for p in GAN_PICTURES], "",
        "## Intended use and limits", "",
        "- Synthetic sequences for method development, augmentation experiments and sharing without the "
        "source data; not biological ground truth. `copies_of_training` counts exact copies of training "
        "sequences.", "",
        "## Versions", "", f"{meta.get('versions', {})}", ""])
    (folder / "model_card.md").write_text(card)
    return folder
