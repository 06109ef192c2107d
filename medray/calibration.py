"""Probability calibration: temperature scaling (Guo et al., 2017) and how it is judged.

One scalar T divides the logits before the softmax; it changes no prediction (the argmax stays) but
makes the probabilities mean what they say. T is fitted by minimising the negative log-likelihood
of the validation predictions; it is stored in the bundle (`calibration.temperature`) and applied
by `Bundle.predict_arrays`, which `predict`, `evaluate`, batch inference and serving all use.

The ECE of probabilities calibrated on the same rows they are judged on is optimistic, so
`calibrate` also reports a cross-fitted ECE: T fitted on one half of the validation rows and
applied to the other, both ways round, and its reliability table. `medray cv` averages the folds'
cross-fitted ECEs and also pools their tables into one ECE over every validated row, the less
biased figure when folds are small (`medray.metrics.pooled_ece`).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from medray.metrics import expected_calibration_error

BOUNDS = (0.05, 20.0)  # the temperatures searched


def scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities re-tempered: softmax(log p / T), the same as dividing the logits by T."""
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)) / temperature
    logp -= logp.max(axis=1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(axis=1, keepdims=True)


def _nll(probs: np.ndarray, y: np.ndarray, temperature: float) -> float:
    return float(-np.log(np.clip(scale(probs, temperature)[np.arange(len(y)), y], 1e-12, None)).mean())


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The T in BOUNDS that minimises the NLL of `probs` (N, K) for the true classes `y`."""
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return 1.0
    res = minimize_scalar(lambda log_t: _nll(probs, y, float(np.exp(log_t))), bounds=np.log(BOUNDS),
                          method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def calibrate(probs: np.ndarray, y: np.ndarray, seed: int = 0) -> dict:
    """Temperature fitted on all of (probs, y), with the ECE before, after (in-sample) and
    cross-fitted (two seeded halves, each calibrated by the other's T)."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y, dtype=np.int64)
    t = fit_temperature(probs, y)
    crossfit = table = None
    if len(y) >= 20:
        order = np.random.default_rng(seed).permutation(len(y))
        halves = order[: len(y) // 2], order[len(y) // 2:]
        scaled = np.empty_like(probs)
        for fit_on, apply_to in (halves, halves[::-1]):
            scaled[apply_to] = scale(probs[apply_to], fit_temperature(probs[fit_on], y[fit_on]))
        crossfit, table = expected_calibration_error(y, scaled)
        crossfit = round(crossfit, 6)
    return {
        "method": "temperature",
        "temperature": round(t, 6),
        "fitted_on": "validation",
        "n": int(len(y)),
        "ece_uncalibrated": round(expected_calibration_error(y, probs)[0], 6),
        "ece_calibrated": round(expected_calibration_error(y, scale(probs, t))[0], 6),
        "ece_crossfit": crossfit,
        "reliability_crossfit": table,  # its bins: `medray cv` pools them over the folds (metrics.pooled_ece)
    }
