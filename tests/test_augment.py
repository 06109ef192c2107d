"""medray.augment: torchvision.transforms.v2 image augmentation, seeded and shape-preserving."""

import pytest
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


def test_sensor_rotation_turns_each_xyz_triplet_and_keeps_its_length_in_sensor_units():
    from medray.augment import check_spec

    n, c, t = 8, 6, 20
    raw = torch.randn(n, c, t) * 2 + 0.5  # sensor units
    mean, std = torch.full((c * t,), 0.5), torch.linspace(1.0, 3.0, c * t)
    x = (raw.reshape(n, -1) - mean) / std  # what the scaler hands the loop
    y = augment_batch(x, {"rotate": 20}, (c, t), torch.Generator().manual_seed(5), stats=(mean, std))
    assert y.shape == x.shape and not torch.allclose(y, x)
    turned = (y * std + mean).reshape(n, c, t)
    for i in (0, 3):  # accelerometer and gyroscope: the vector length at each step is unchanged
        assert torch.allclose(turned[:, i:i + 3].norm(dim=1), raw[:, i:i + 3].norm(dim=1), atol=1e-4)
    again = augment_batch(x, {"rotate": 20}, (c, t), torch.Generator().manual_seed(5), stats=(mean, std))
    assert torch.equal(y, again)
    with pytest.raises(ValueError, match="4 channels.*multiple of 3"):
        check_spec({"rotate": 15}, (4, 20))
    check_spec({"rotate": 15}, (1, 32, 32))  # images rotate in the plane: any channel count


def test_mixup_blends_pairs_and_their_labels_with_one_seeded_weight():
    from medray.augment import mix

    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 3
    mixed, ya, yb, lam = mix(x, y, 0.2, torch.Generator().manual_seed(2))
    assert 0.0 <= lam <= 1.0 and torch.equal(ya, y)
    # each row is lam·x_i + (1 − lam)·x_j for the j whose label yb names
    for i in range(16):
        diffs = [(mixed[i] - (lam * x[i] + (1 - lam) * x[j])).abs().max() for j in range(16)]
        j = int(torch.stack(diffs).argmin())
        assert diffs[j] < 1e-5 and yb[i] == y[j]
    again = mix(x, y, 0.2, torch.Generator().manual_seed(2))
    assert again[3] == lam and torch.equal(again[0], mixed)
