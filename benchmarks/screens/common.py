"""What the recipe screens share: one member's training loop, one fold's figures, and the candidate's
summary line (printed and appended to benchmarks/results/screen_<task>.jsonl)."""
import json
import time
from pathlib import Path

import numpy as np
import torch

from medray.metrics import classification_metrics

RESULTS = Path(__file__).resolve().parents[1] / "results"


def fit(net, tr, batch, *, epochs, lr, wd, bs, loss_fn=None, mixup=0.0, gen, halves=1, part_loss=None):
    """Train one member: AdamW, cosine schedule per step, a seeded shuffle per epoch; `batch(idx)`
    gives a step's (augmented) inputs and labels; mixup blends pairs and their losses alike. With
    `halves`, each step's rows go through the network in that many parts (their own BatchNorm
    statistics and mixup pairs) and the parts' losses are averaged: what as many DDP workers do.
    `part_loss(idx)`, when given, is a part's whole loss (its own augmentation and mixing) instead."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    spe = -(-len(tr) // bs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * spe)
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(len(tr), generator=gen)
        for i in range(spe):
            loss = 0
            for part in torch.from_numpy(tr)[perm[i * bs:(i + 1) * bs]].chunk(halves):
                if part_loss is not None:
                    loss = loss + part_loss(part) / halves
                    continue
                x, yb = batch(part)
                if mixup:
                    lam = float(np.random.default_rng(ep * 1000 + i).beta(mixup, mixup))
                    p2 = torch.randperm(len(yb), generator=gen)
                    out = net(lam * x + (1 - lam) * x[p2])
                    loss = loss + (lam * loss_fn(out, yb) + (1 - lam) * loss_fn(out, yb[p2])) / halves
                else:
                    loss = loss + loss_fn(net(x), yb) / halves
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    return net.eval()


def fold_figures(name, fold, y, probs, labels, t0, res):
    m = classification_metrics(y, probs, labels)
    res.append([m["accuracy"], m["balanced_accuracy"], m["ece"], time.time() - t0])
    print(name, "fold", fold, np.round(res[-1], 3), flush=True)


def summarise(task, name, res):
    r = np.array(res)
    line = {"name": name, "acc": r[:, 0].mean(), "acc_sd": r[:, 0].std(ddof=1) if len(r) > 1 else 0,
            "bal": r[:, 1].mean(), "ece": r[:, 2].mean(), "s": r[:, 3].sum(), "folds": r[:, 0].round(3).tolist()}
    print("RESULT", json.dumps(line), flush=True)
    with open(RESULTS / f"screen_{task}.jsonl", "a") as fh:
        fh.write(json.dumps(line) + "\n")
