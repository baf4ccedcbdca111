"""Sample-quality metrics: Frechet distance and a fixed digits classifier.

On the embedded digits set the Frechet distance is computed in *pixel space*
(each 8x8 image flattened to a 64-d vector), against the Gaussian statistics of
the full 1,797-image set. There is no Inception network at this scale; the
pixel-space distance only asks whether the samples match the data's first and
second moments, a cheap and coarse quality measure.

Accuracy uses a fixed classifier (an RBF support-vector machine on pixels with
fixed hyperparameters, fitted deterministically on the full set): a
class-conditional generator's samples for label ``y`` should be classified as
``y``.

Clipping: every digits metric clips samples to ``[-1, 1]`` first. The data lies
in that range, generated samples can overshoot it, and the images a user would
save or look at are clipped anyway; clipping keeps a few out-of-range pixels
from dominating the covariance.
"""

from __future__ import annotations

import functools

import numpy as np

from apt_jax.data.digits import IMAGE_SHAPE, load_digits_arrays

_DIGITS_DIM = int(np.prod(IMAGE_SHAPE))


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (unbiased, float64) of ``features (N, D)``."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D); got shape {x.shape}.")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance; got {x.shape[0]}.")
    mu = x.mean(axis=0)
    cov = np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])
    return mu, cov


def _psd_sqrt(mat: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) PSD matrix; negative eigenvalues -> 0."""
    mat = 0.5 * (mat + mat.T)
    w, v = np.linalg.eigh(mat)
    w = np.clip(w, 0.0, None)
    return (v * np.sqrt(w)) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``.

    ``||mu1 - mu2||^2 + Tr(cov1) + Tr(cov2) - 2 Tr(sqrtm(cov1 @ cov2))``.

    ``Tr(sqrtm(cov1 @ cov2))`` equals ``Tr(sqrtm(S cov2 S))`` with ``S = sqrtm(cov1)``,
    and ``S cov2 S`` is symmetric PSD, so the trace is the sum of square roots of
    its (clipped non-negative) eigenvalues: real, stable, and exact for singular
    covariances (no ``eps * I`` offset needed). The result is clipped at 0.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    cov1 = np.atleast_2d(np.asarray(cov1, dtype=np.float64))
    cov2 = np.atleast_2d(np.asarray(cov2, dtype=np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, cov1 {cov1.shape}, mu2 {mu2.shape}, "
            f"cov2 {cov2.shape}."
        )
    cov1 = 0.5 * (cov1 + cov1.T)
    cov2 = 0.5 * (cov2 + cov2.T)
    s1 = _psd_sqrt(cov1)
    inner = s1 @ cov2 @ s1
    eig = np.linalg.eigvalsh(0.5 * (inner + inner.T))
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean
    return float(max(fd, 0.0))


def _flatten_digits(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, dtype=np.float64)
    if x.ndim < 2 or int(np.prod(x.shape[1:])) != _DIGITS_DIM:
        raise ValueError(
            f"expected digits images shaped (N, {', '.join(map(str, IMAGE_SHAPE))}) "
            f"(or (N, 64)); got {x.shape}."
        )
    return np.clip(x.reshape(x.shape[0], _DIGITS_DIM), -1.0, 1.0)


@functools.lru_cache(maxsize=1)
def _digits_reference_statistics() -> tuple[np.ndarray, np.ndarray]:
    images, _ = load_digits_arrays()
    mu, cov = gaussian_statistics(images.reshape(len(images), -1))
    mu.setflags(write=False)
    cov.setflags(write=False)
    return mu, cov


def digits_frechet_distance(images: np.ndarray) -> float:
    """Pixel-space Frechet distance of ``images (N, 8, 8, 1)`` in ``[-1, 1]`` to the digits set.

    Samples are clipped to ``[-1, 1]`` first. The reference is the full set.
    Note the estimate is biased upward for small ``N`` (a covariance from few
    samples); compare numbers computed with the same ``N``.
    """
    mu, cov = gaussian_statistics(_flatten_digits(images))
    mu_ref, cov_ref = _digits_reference_statistics()
    return frechet_distance(mu, cov, mu_ref, cov_ref)


class DigitsClassifier:
    """A fixed pixel classifier for ``(N, 8, 8, 1)`` digits images in ``[-1, 1]``.

    An RBF support-vector machine on the 64 pixels (``C=10``, ``gamma=0.04`` on the
    ``[-1, 1]`` scale, i.e. ``gamma=0.000625`` on the raw 0..16 pixels),
    deterministic given the training data; about 99% held-out accuracy on a
    50/50 split.
    ``DigitsClassifier.fit(images, labels)`` fits on any subset (used to measure
    held-out accuracy); ``get_digits_classifier()`` returns
    the cached one fitted on the whole set, which all evaluations use.
    """

    C = 10.0
    GAMMA = 0.04

    def __init__(self, model):
        self._model = model

    @classmethod
    def fit(cls, images: np.ndarray, labels: np.ndarray) -> DigitsClassifier:
        from sklearn.svm import SVC

        model = SVC(C=cls.C, gamma=cls.GAMMA, kernel="rbf")
        model.fit(_flatten_digits(images), np.asarray(labels).astype(np.int64))
        return cls(model)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Predicted labels, int32 ``(N,)``; images are clipped to ``[-1, 1]``."""
        return self._model.predict(_flatten_digits(images)).astype(np.int32)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        """Fraction of ``images`` classified as ``labels``."""
        labels = np.asarray(labels).reshape(-1)
        return float(np.mean(self.predict(images) == labels))


@functools.lru_cache(maxsize=1)
def get_digits_classifier() -> DigitsClassifier:
    """The fixed classifier, fitted once on all 1,797 digits."""
    images, labels = load_digits_arrays()
    return DigitsClassifier.fit(images, labels)


def evaluate_digits(images: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Frechet distance (pixels, vs the full set) and, given labels, classifier accuracy.

    Returns ``{"frechet_distance": float, "accuracy": float | None, "num_samples": int}``.
    """
    images = np.asarray(images)
    result = {
        "frechet_distance": digits_frechet_distance(images),
        "accuracy": None,
        "num_samples": int(images.shape[0]),
    }
    if labels is not None:
        result["accuracy"] = get_digits_classifier().accuracy(images, labels)
    return result
