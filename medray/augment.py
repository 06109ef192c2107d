"""Training-time augmentation on batches (tensors), configured per model in the presets.

Images (N, 1, H, W): `hflip` (random horizontal flip), `shift` (random translation, fraction of
the side), `brightness` (random additive/multiplicative jitter in normalised units).
Time series (N, F) with a (C, T) layout: `time_shift` (random circular shift, fraction of T),
`scale` (random per-channel amplitude scaling).
"""

from __future__ import annotations

import torch


def augment_batch(x: torch.Tensor, spec: dict, input_shape, generator: torch.Generator | None = None) -> torch.Tensor:
    if not spec:
        return x
    n = x.shape[0]
    dev = x.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator).to(dev)

    if len(input_shape) == 3:  # images
        if spec.get("hflip"):
            flip = rand(n) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if spec.get("shift"):
            h, w = input_shape[1:]
            m = int(spec["shift"] * min(h, w))
            if m > 0:
                padded = torch.nn.functional.pad(x, (m, m, m, m), mode="replicate")
                dy = (rand(n) * (2 * m + 1)).long().tolist()
                dx = (rand(n) * (2 * m + 1)).long().tolist()
                x = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
        if spec.get("brightness"):
            b = spec["brightness"]
            x = x * (1 + (rand(n, 1, 1, 1) * 2 - 1) * b) + (rand(n, 1, 1, 1) * 2 - 1) * b
        return x
    if len(input_shape) == 2:  # (channels, time) series stored flat
        c, t = input_shape
        original = x.shape
        x = x.reshape(n, c, t)
        if spec.get("time_shift"):
            m = int(spec["time_shift"] * t)
            shifts = ((rand(n) * (2 * m + 1)).long() - m).tolist()
            x = torch.stack([torch.roll(x[i], shifts[i], dims=-1) for i in range(n)])
        if spec.get("scale"):
            x = x * (1 + (rand(n, c, 1) * 2 - 1) * spec["scale"])
        return x.reshape(original)
    return x
