"""Moving-digits video metrics: per-frame Frechet distance, per-frame digit
accuracy, and how well the digit moves.

All three read the frames themselves (no network):

* **Per-frame Frechet distance**: every frame of every clip flattened to a
  ``canvas^2`` pixel vector, against the Gaussian statistics of the frames of a
  fixed reference set (clips ``0..`` of `MovingDigitsSource` with the same
  geometry and seed ``REFERENCE_SEED``, about 16k frames). As on the image
  digits, a pixel-space moment match: coarse and cheap.
* **Per-frame accuracy**: each frame is cropped to the 8x8 window holding the
  most ink (the digit, wherever it is) and classified by an RBF SVM fitted on
  the same crops of real frames; a clip of label ``y`` should read ``y`` in
  every frame.
* **Motion error**: the digit's centre of mass (ink-weighted, ink = ``(x + 1) /
  2``) is tracked through the clip, and each axis is fitted by the best path of
  the data's motion rule, ``offset + bounce(start + velocity * f, L)`` with a
  speed in ``[1, max_speed]`` pixels per frame (see `apt_jax.data.moving_digits`).
  The error is the root-mean-square distance, in pixels, from the track to that
  path: 0 for real clips, larger for a digit that jitters, drifts, stalls or
  vanishes. ``mean_speed`` (centre-of-mass pixels per frame per axis) tells a
  digit that moves right from one that sits still.

Samples are clipped to ``[-1, 1]`` first, as for the image metrics.
"""

from __future__ import annotations

import functools

import numpy as np

from apt_jax.data.moving_digits import DIGIT_SIDE, MovingDigitsSource, bounce
from apt_jax.eval.metrics import DigitsClassifier, frechet_distance, gaussian_statistics

REFERENCE_SEED = 1  # the training set uses seed 0; the reference is another draw
REFERENCE_FRAMES = 16384
CLASSIFIER_SEED = 2
# Grid of the motion fit: start positions and speeds in quarter pixels.
FIT_RESOLUTION = 0.25


def _check_videos(videos: np.ndarray) -> np.ndarray:
    x = np.asarray(videos, dtype=np.float64)
    if x.ndim != 5 or x.shape[-1] != 1 or x.shape[2] != x.shape[3]:
        raise ValueError(f"videos must be (N, F, S, S, 1) grayscale clips; got shape {x.shape}.")
    if x.shape[2] < DIGIT_SIDE:
        raise ValueError(f"frames are {x.shape[2]} pixels, smaller than the 8x8 digit.")
    return np.clip(x, -1.0, 1.0)


def ink(frames: np.ndarray) -> np.ndarray:
    """``(x + 1) / 2`` of clipped frames: 0 on the black background, 1 at full ink."""
    return (np.clip(frames, -1.0, 1.0) + 1.0) / 2.0


# ------------------------------------------------------------------- distance
@functools.lru_cache(maxsize=8)
def reference_statistics(
    num_frames: int, canvas: int, max_speed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the frames of the reference clips (cached, read-only)."""
    clips = -(-REFERENCE_FRAMES // num_frames)
    source = MovingDigitsSource(num_frames, canvas, max_speed, num_clips=clips, seed=REFERENCE_SEED)
    videos, _ = source.clips(range(clips))
    mu, cov = gaussian_statistics(videos.reshape(-1, canvas * canvas))
    mu.setflags(write=False)
    cov.setflags(write=False)
    return mu, cov


def frame_frechet_distance(videos: np.ndarray, max_speed: int = 2) -> float:
    """Pixel-space Frechet distance of all frames of ``videos (N, F, S, S, 1)`` to the
    reference frames of clips with the same ``F``, ``S`` and ``max_speed``."""
    x = _check_videos(videos)
    n, f, s = x.shape[:3]
    mu, cov = gaussian_statistics(x.reshape(n * f, s * s))
    mu_ref, cov_ref = reference_statistics(f, s, max_speed)
    return frechet_distance(mu, cov, mu_ref, cov_ref)


# ------------------------------------------------------------------- accuracy
def crop_digits(frames: np.ndarray) -> np.ndarray:
    """The 8x8 window with the most ink of each frame ``(N, S, S, 1)`` -> ``(N, 8, 8, 1)``.

    Ties go to the first window in row-major order, so a digit's crop is the same
    wherever it sits in the canvas (away from the borders).
    """
    x = np.clip(np.asarray(frames, dtype=np.float64), -1.0, 1.0)
    n, s = x.shape[0], x.shape[1]
    w = ink(x[..., 0])
    # Window sums from an integral image: sums[i, r, c] = ink of x[i, r:r+8, c:c+8].
    integral = np.pad(w.cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))
    k = DIGIT_SIDE
    sums = integral[:, k:, k:] - integral[:, :-k, k:] - integral[:, k:, :-k] + integral[:, :-k, :-k]
    positions = s - k + 1
    # Round away float noise so exact ties stay ties (first window wins).
    best = np.argmax(np.round(sums.reshape(n, -1), 9), axis=1)
    rows, cols = np.divmod(best, positions)
    r = rows[:, None] + np.arange(k)[None, :]
    c = cols[:, None] + np.arange(k)[None, :]
    return x[np.arange(n)[:, None, None], r[:, :, None], c[:, None, :]].astype(np.float32)


@functools.lru_cache(maxsize=4)
def frame_classifier(canvas: int) -> DigitsClassifier:
    """An RBF SVM on the ink crops of real frames: every digit of the set at two
    random positions of a ``canvas``-sided frame (cached)."""
    source = MovingDigitsSource(1, canvas, num_clips=2 * 1797, seed=CLASSIFIER_SEED)
    videos, labels = source.clips(range(len(source)))
    return DigitsClassifier.fit(crop_digits(videos[:, 0]), labels)


def frame_accuracy(videos: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of all frames whose crop the frame classifier reads as the clip's label."""
    x = _check_videos(videos)
    n, f, s = x.shape[:3]
    labels = np.repeat(np.asarray(labels).reshape(n), f)
    return frame_classifier(s).accuracy(crop_digits(x.reshape(n * f, s, s, 1)), labels)


# --------------------------------------------------------------------- motion
def centres_of_mass(videos: np.ndarray) -> np.ndarray:
    """Ink-weighted centre of each frame, ``(N, F, 2)`` (row, column) in pixels.

    A frame without ink gets the canvas centre.
    """
    x = _check_videos(videos)
    w = ink(x[..., 0])  # (N, F, S, S)
    s = x.shape[2]
    total = w.sum(axis=(2, 3))
    coords = np.arange(s, dtype=np.float64)
    row = np.einsum("nfrc,r->nf", w, coords)
    col = np.einsum("nfrc,c->nf", w, coords)
    centre = (s - 1) / 2.0
    safe = np.where(total > 1e-9, total, 1.0)
    com = np.stack([row / safe, col / safe], axis=-1)
    return np.where((total > 1e-9)[..., None], com, centre)


def _candidate_paths(num_frames: int, travel: int, max_speed: int) -> np.ndarray:
    """Every path ``bounce(start + v * f, travel)`` of the fit grid, ``(P, num_frames)``."""
    starts = np.arange(0.0, travel + FIT_RESOLUTION / 2, FIT_RESOLUTION)
    speeds = np.arange(1.0, max_speed + FIT_RESOLUTION / 2, FIT_RESOLUTION)
    velocities = np.concatenate([-speeds, speeds])
    f = np.arange(num_frames, dtype=np.float64)
    u = starts[:, None, None] + velocities[None, :, None] * f
    return bounce(u, travel).reshape(-1, num_frames)


def motion_errors(videos: np.ndarray, max_speed: int = 2) -> np.ndarray:
    """Per-clip RMS distance (pixels) of the centre-of-mass track from the best path
    of the motion rule, ``(N,)``; both axes fitted independently, each with a free
    offset (the centre of mass sits anywhere inside the 8x8 digit)."""
    x = _check_videos(videos)
    n, f, s = x.shape[:3]
    if f < 2:
        raise ValueError("motion needs clips of at least 2 frames.")
    track = centres_of_mass(x).transpose(0, 2, 1).reshape(n * 2, f)  # (2N, F)
    paths = _candidate_paths(f, s - DIGIT_SIDE, max_speed)  # (P, F)
    residual = track[:, None, :] - paths[None, :, :]  # (2N, P, F)
    residual -= residual.mean(axis=-1, keepdims=True)  # the best offset of each path
    best = (residual**2).mean(axis=-1).min(axis=1)  # (2N,) mean square per frame
    return np.sqrt(best.reshape(n, 2).mean(axis=1))


def mean_speed(videos: np.ndarray) -> float:
    """Mean absolute centre-of-mass step, pixels per frame per axis."""
    com = centres_of_mass(videos)
    return float(np.abs(np.diff(com, axis=1)).mean())


def evaluate_moving_digits(videos: np.ndarray, labels: np.ndarray, max_speed: int = 2) -> dict:
    """Per-frame distance and accuracy, and for clips of 2+ frames the motion.

    Returns ``{"frame_frechet_distance", "frame_accuracy", "motion_error",
    "mean_speed", "num_samples"}`` (motion entries None for one-frame clips).
    """
    x = _check_videos(videos)
    moving = x.shape[1] >= 2
    return {
        "frame_frechet_distance": frame_frechet_distance(x, max_speed),
        "frame_accuracy": frame_accuracy(x, labels),
        "motion_error": float(motion_errors(x, max_speed).mean()) if moving else None,
        "mean_speed": mean_speed(x) if moving else None,
        "num_samples": int(x.shape[0]),
    }
