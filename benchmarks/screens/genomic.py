"""Fast screen of splice-site recipes: grouped 5-fold CV in one process (plain PyTorch loop, the
project's own reader, encoder, models, metrics and seeded folds from medray.split: the folds of
`medray cv`, seed 0, grouped by locus), so a candidate costs seconds to minutes instead of a Ray
Train job per fold. A screen, not the verdict: a recipe it favours is adopted in medray/presets/
with the figures, and re-measured with `medray cv` (benchmarks/model_selection.py). Results append to
benchmarks/results/screen_genomic.jsonl.

    .venv/bin/python benchmarks/screens/genomic.py 'run("poscnn")'
    .venv/bin/python benchmarks/screens/genomic.py 'run("poscnn-k9-h128", params={"kernel_size": 9, "hidden": 128})'
"""
import sys, time
import numpy as np, torch
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from medray.data.genomic import read_genomic
from medray.models import build_model
from medray.preprocessing import SequenceEncoder
from medray.split import resolve_groups, split_indices
from medray.tasks import load_preset
from common import fit, fold_figures, summarise
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
DS = read_genomic(str(ROOT.parent / "shared" / "data" / "genomic" / "splice.fasta"))
labels = sorted(set(DS.labels)); y_all = np.array([labels.index(v) for v in DS.labels])
groups = resolve_groups("id-prefix", DS)
ENC = SequenceEncoder.fit(DS.inputs)
X = torch.from_numpy(ENC.transform(DS.inputs)); Y = torch.from_numpy(y_all)


def run(name, model="poscnn", params=None, epochs=60, lr=2e-3, wd=0.01, bs=64, ls=0.0, members=1, mixup=0.0,
        input_dropout=0.0, folds=range(5)):
    params = {**load_preset("genomic", model)["params"], **(params or {})}  # the preset's, overridden
    res = []
    for f in folds:
        t0 = time.time()
        tr, va = split_indices(y_all, groups, 0.2, 0, fold=(5, f))
        probs_sum = 0
        for mem in range(members):
            torch.manual_seed(mem); gen = torch.Generator().manual_seed(1000 + mem)
            net = build_model({"name": model, "params": params}, list(X.shape[1:]), len(labels))

            def batch(idx):
                x = X[idx]
                if input_dropout:  # whole positions blanked (as if N), a regulariser against one-locus motifs
                    x = x * (torch.rand(len(idx), 1, x.shape[2], generator=gen) >= input_dropout).float()
                return x, Y[idx]

            fit(net, tr, batch, epochs=epochs, lr=lr, wd=wd, bs=bs, loss_fn=torch.nn.CrossEntropyLoss(label_smoothing=ls),
                mixup=mixup, gen=gen)
            with torch.no_grad():
                probs_sum = probs_sum + torch.softmax(net(X[va]), 1).numpy()
        fold_figures(name, f, y_all[va], probs_sum / members, labels, t0, res)
    summarise("genomic", name, res)


if __name__ == "__main__":
    for stmt in sys.argv[1].split(";;"):
        exec(stmt)
