"""medray.augment: torchvision.transforms.v2 image augmentation, seeded and shape-preserving."""

import torch

from medray.augment import augment_batch

SHAPE = (1, 32, 32)
FULL = {"hflip": True, "shift": 0.1, "rotate": 10, "crop_scale": [0.7, 1.0], "brightness": 0.1, "contrast": 0.2}


def _batch(n=8):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(0))


def test_same_seed_same_augmentation_and_global_rng_untouched():
    x = _batch()
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = augment_batch(x, FULL, SHAPE, torch.Generator().manual_seed(7))
    after = torch.rand(3)  # the training loop's stream (dropout) is not consumed by the augmentation
    b = augment_batch(x, FULL, SHAPE, torch.Generator().manual_seed(7))
    c = augment_batch(x, FULL, SHAPE, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(before, after)


def test_shapes_dtype_and_range_kept():
    x = _batch(16)
    y = augment_batch(x, FULL, SHAPE, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    # geometry only resamples pixels (corners filled with each image's darkest value); the
    # intensity jitter is bounded by brightness and contrast
    geo = augment_batch(x, {"hflip": True, "shift": 0.1, "rotate": 10, "crop_scale": [0.7, 1.0]}, SHAPE,
                        torch.Generator().manual_seed(1))
    lo, hi = x.amin(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))
    assert (geo.amin(dim=(1, 2, 3)) >= lo - 1e-4).all() and (geo.amax(dim=(1, 2, 3)) <= hi + 1e-4).all()
    assert (y.abs().amax() <= x.abs().amax() * 1.1 * 1.2 + 0.2)


def test_flip_is_a_flip_and_empty_spec_is_identity():
    x = _batch(64)
    y = augment_batch(x, {"hflip": True}, SHAPE, torch.Generator().manual_seed(3))
    flipped = [torch.allclose(y[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.allclose(y[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54
    assert augment_batch(x, {}, SHAPE) is x


def test_time_series_keys_still_work():
    x = torch.randn(4, 3 * 20)
    y = augment_batch(x, {"time_shift": 0.1, "scale": 0.1}, (3, 20), torch.Generator().manual_seed(0))
    assert y.shape == x.shape
