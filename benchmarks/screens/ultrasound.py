"""Fast screen of ultrasound training recipes: grouped 5-fold CV in one process (plain PyTorch loop, the
project's own models, augmentation, metrics and seeded folds from medray.split: the folds of
`medray cv`, seed 0), so a candidate costs minutes instead of a Ray Train job per fold. A screen, not
the verdict: a recipe it favours is adopted in medray/presets/ with the figures, and re-measured with
`medray cv` (benchmarks/model_selection.py). Results append to benchmarks/results/screen_ultrasound.jsonl.

    .venv/bin/python benchmarks/screens/ultrasound.py 'run("s64-mixup", size=64, mixup=0.2)'
    .venv/bin/python benchmarks/screens/ultrasound.py 'run_joint("joint-halves")'
"""
import sys, time
import numpy as np, pandas as pd, torch
from PIL import Image
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from medray.models import build_model
from medray.augment import augment_batch
from common import fit, fold_figures, summarise
from medray.split import split_indices
torch.set_num_threads(2)
D = str(ROOT.parent / "shared" / "data" / "ultrasound") + "/"
lab = pd.read_csv(D + "labels.csv"); man = pd.read_csv(D + "manifest.csv")
labels = sorted(lab.label.unique()); y_all = np.array([labels.index(v) for v in lab.label])
groups = man.dup_group.astype(str).to_numpy(); conflict = man.label_conflict.to_numpy().astype(bool)
IM = np.stack([np.asarray(Image.open(D + p).convert("L").resize((128, 128))) for p in lab.path]).astype(np.float32) / 255

def run(name, model="convnet", params=None, epochs=40, lr=3e-3, wd=0.01, bs=64, aug=None, ls=0.0, mixup=0.0,
        members=1, exclude=False, size=128, folds=range(5), tta=False, save=None, inorm=False):
    params = params or {"widths": [16, 32, 64, 128], "dropout": 0.3}
    aug = {"hflip": True, "shift": 0.06, "brightness": 0.1} if aug is None else aug
    res = []
    for f in folds:
        t0 = time.time()
        tr, va = split_indices(lab.label.to_numpy(), groups, 0.2, 0, fold=(5, f))
        if exclude: tr = tr[~conflict[tr]]
        X = torch.from_numpy(IM)
        if size != 128: X = torch.nn.functional.interpolate(X[:, None], size=(size, size), mode="area")[:, 0]
        if inorm:  # each image standardised by its own mean and sd (a scanner's gain and brightness removed)
            X = (X - X.mean((1, 2), keepdim=True)) / X.std((1, 2), keepdim=True).clamp_min(1e-6)
        m, s = X[tr].mean(), X[tr].std()
        X = ((X - m) / s)[:, None]
        Y = torch.from_numpy(y_all)
        cnt = np.bincount(y_all[tr], minlength=3); w = torch.tensor(len(tr) / (3 * cnt), dtype=torch.float32)
        probs_sum = 0
        for mem in range(members):
            torch.manual_seed(mem); gen = torch.Generator().manual_seed(1000 + mem)
            net = build_model({"name": model, "params": params}, [1, size, size], 3)
            fit(net, tr, lambda idx: (augment_batch(X[idx], aug, [1, size, size], gen), Y[idx]), epochs=epochs, lr=lr,
                wd=wd, bs=bs, loss_fn=torch.nn.CrossEntropyLoss(weight=w, label_smoothing=ls), mixup=mixup, gen=gen)
            ev = net
            with torch.no_grad():
                lg = ev(X[va]);
                if tta: lg = (lg + ev(X[va].flip(-1))) / 2
            probs_sum = probs_sum + torch.softmax(lg, 1).numpy()
            if save:  # each member's probabilities, to score ensembles of any size afterwards
                __import__("pathlib").Path(save).mkdir(parents=True, exist_ok=True)
                np.save(f"{save}/{name}-f{f}-m{mem}.npy", torch.softmax(lg, 1).numpy())
        p = probs_sum / members
        fold_figures(name, f, y_all[va], p, labels, t0, res)
    summarise("ultrasound", name, res)


def run_joint(name, halves=2, own=False, members=3, epochs=40, lr=3e-3, wd=0.01, bs=64, size=64, mixup=0.2,
              folds=range(5)):
    """The ensemble as `medray train` trains it: members side by side on the same batches, one loss
    each (`Ensemble.forward(x, members=True)`), each batch split in `halves` as `halves` DDP workers
    split it (their own BatchNorm statistics, augmentation and mixup; gradients averaged). With
    `own`, each member draws its own augmentation and mixup of the rows (as `run`'s separately
    trained members do)."""
    from medray.augment import mix

    aug = {"hflip": True, "shift": 0.06, "brightness": 0.1}
    res = []
    for f in folds:
        t0 = time.time()
        tr, va = split_indices(lab.label.to_numpy(), groups, 0.2, 0, fold=(5, f))
        X = torch.nn.functional.interpolate(torch.from_numpy(IM)[:, None], size=(size, size), mode="area")[:, 0]
        m, s = X[tr].mean(), X[tr].std()
        X, Y = ((X - m) / s)[:, None], torch.from_numpy(y_all)
        cnt = np.bincount(y_all[tr], minlength=3)
        loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(len(tr) / (3 * cnt), dtype=torch.float32))
        torch.manual_seed(0); gen = torch.Generator().manual_seed(1000)
        member = {"name": "convnet", "params": {"widths": [16, 32, 64, 128], "dropout": 0.3}}
        net = build_model({"name": "ensemble", "params": {"members": members, "member": member}}, [1, size, size], 3)

        def blended(z, y1, y2, lam):
            return lam * loss_fn(z, y1) + (1 - lam) * loss_fn(z, y2)

        def part_loss(part):
            if own:
                views = [mix(augment_batch(X[part], aug, [1, size, size], gen), Y[part], mixup, gen)
                         for _ in range(members)]
                return sum(blended(mem(v[0]), *v[1:]) for mem, v in zip(net.members, views))
            xa, y1, y2, lam = mix(augment_batch(X[part], aug, [1, size, size], gen), Y[part], mixup, gen)
            return torch.stack([blended(z, y1, y2, lam) for z in net(xa, members=True)]).sum()

        fit(net, tr, None, epochs=epochs, lr=lr, wd=wd, bs=bs, gen=gen, halves=halves, part_loss=part_loss)
        net.eval()
        with torch.no_grad():
            p = torch.softmax(net(X[va]), 1).numpy()
        fold_figures(name, f, y_all[va], p, labels, t0, res)
    summarise("ultrasound", name, res)

if __name__ == "__main__":
    exec(sys.argv[1])
