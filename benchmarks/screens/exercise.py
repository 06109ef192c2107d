"""Fast screen of exercise training recipes: grouped 5-fold CV in one process (plain PyTorch loop, the
project's own models, augmentation, metrics and seeded folds from medray.split: the folds of
`medray cv`, seed 0), so a candidate costs minutes instead of a Ray Train job per fold. A screen, not
the verdict: a recipe it favours is adopted in medray/presets/ with the figures, and re-measured with
`medray cv` (benchmarks/model_selection.py). Results append to benchmarks/results/screen_exercise.jsonl.

    .venv/bin/python benchmarks/screens/exercise.py 'run("ex-rot15", members=1, rotate=15)' 1
"""
import sys, time
import numpy as np, pandas as pd, torch
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from medray.models import build_model
from medray.augment import augment_batch
from common import fit, fold_figures, summarise
from medray.split import split_indices
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
D = str(ROOT.parent / "shared" / "data" / "exercise") + "/"
df = pd.read_csv(D + "exercise_windows.csv"); meta = pd.read_csv(D + "exercise_windows_meta.csv")
labels = sorted(df.label.unique()); y_all = np.array([labels.index(v) for v in df.label])
groups = meta.subject.astype(str).to_numpy()
XR = df.drop(columns="label").to_numpy(np.float32).reshape(len(df), 6, 100)
SIGN = torch.tensor([-1, 1, 1, 1, -1, -1], dtype=torch.float32)[None, :, None]

def norm_channels(raw):
    """|acc| and |gyro| per time step, in sensor units: unchanged by any rotation of the sensor."""
    return torch.cat([raw[:, 0:3].norm(dim=1, keepdim=True), raw[:, 3:6].norm(dim=1, keepdim=True)], 1)


class JointLoss(torch.nn.Module):
    """An Ensemble trained as `medray train` trains it: the members' logits side by side, (N, members ×
    classes), for `joint_loss`, the sum of the members' losses."""

    def __init__(self, ensemble):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x):
        return torch.cat(list(self.ensemble(x, members=True)), dim=1)


def joint_loss(base):
    return lambda out, y: sum(base(z, y) for z in out.split(len(labels), dim=1))


def axis_rotate(x, degrees, axis, gen):
    """Each window's accelerometer and gyroscope triplets rotated by one random angle (± degrees)
    about one sensor axis (0, 1, 2: x, y, z) only, as a watch turned about that axis would read."""
    n = len(x)
    a = (torch.rand(n, generator=gen) * 2 - 1) * np.radians(degrees)
    c, s_ = torch.cos(a), torch.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = torch.zeros(n, 3, 3); r[:, axis, axis] = 1
    r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s_, s_, c
    return torch.cat([torch.einsum("nij,njt->nit", r, x[:, 0:3]), torch.einsum("nij,njt->nit", r, x[:, 3:6])], 1)


def run(name, params=None, epochs=30, lr=1e-3, wd=1e-4, bs=128, aug=None, ls=0.0, members=3, mirror=0.0,
        rotate=0.0, inorm=False, folds=range(5), mixup=0.0, tta_mirror=False, norms=False, save=None, halves=1,
        joint=False, axis=None):
    params = params or {"channels": [32, 64, 64], "kernel_size": 7, "dropout": 0.3, "pool": 2}
    aug = {"time_shift": 0.5, "scale": 0.1} if aug is None else aug
    res = []
    for f in folds:
        t0 = time.time()
        tr, va = split_indices(df.label.to_numpy(), groups, 0.2, 0, fold=(5, f))
        X = torch.from_numpy(XR.copy())
        if norms: NR = norm_channels(X); nm, ns = NR[tr].mean((0, 2), keepdim=True), NR[tr].std((0, 2), keepdim=True)
        if inorm: X = X - X.mean(-1, keepdim=True)
        m, s = X[tr].mean((0, 2), keepdim=True), X[tr].std((0, 2), keepdim=True)
        Y = torch.from_numpy(y_all)
        probs_sum = 0
        # joint: the members as `medray train` trains them, one Ensemble (side by side on the same
        # batches, one loss each, each member's probabilities kept), else one independent run each
        for mem in range(1 if joint else members):
            torch.manual_seed(mem); gen = torch.Generator().manual_seed(1000 + mem)
            member = {"name": "cnn1d", "params": params}
            net = build_model({"name": "ensemble", "params": {"members": members, "member": member}} if joint else member,
                              [8 if norms else 6, 100], 7)

            def batch(idx):
                x, n = X[idx].clone(), len(idx)
                if mirror:
                    flip = (torch.rand(n, generator=gen) < mirror).float()[:, None, None]
                    x = x * (1 - flip) + x * SIGN * flip
                if rotate and axis is not None:
                    x = axis_rotate(x, rotate, axis, gen)
                elif rotate:  # in sensor units, before standardising (the training loop undoes its scaler)
                    x = augment_batch(x.reshape(n, -1), {"rotate": rotate}, [6, 100], gen).reshape(n, 6, 100)
                x = (x - m) / s
                if norms: x = torch.cat([x, (NR[idx] - nm) / ns], 1)
                c = x.shape[1]
                return augment_batch(x.reshape(n, -1), aug, [c, 100], gen).reshape(n, c, 100), Y[idx]

            fit(JointLoss(net) if joint else net, tr, batch, epochs=epochs, lr=lr, wd=wd, bs=bs,
                loss_fn=(joint_loss if joint else (lambda f: f))(torch.nn.CrossEntropyLoss(label_smoothing=ls)),
                mixup=mixup, gen=gen, halves=halves)
            net.eval()
            with torch.no_grad():
                xv = (X[va] - m) / s
                p = torch.softmax(net(torch.cat([xv, (NR[va] - nm) / ns], 1) if norms else xv), 1)
                if tta_mirror: p = (p + torch.softmax(net((X[va] * SIGN - m) / s), 1)) / 2
            probs_sum = probs_sum + p.numpy()
            if save:  # each member's probabilities, to score ensembles of any size (and their seed spread)
                __import__("pathlib").Path(save).mkdir(parents=True, exist_ok=True)
                np.save(f"{save}/{name}-f{f}-m{mem}.npy", p.numpy())
        p = probs_sum / (1 if joint else members)
        fold_figures(name, f, y_all[va], p, labels, t0, res)
    summarise("exercise", name, res)


if __name__ == "__main__":
    exec(sys.argv[1])
