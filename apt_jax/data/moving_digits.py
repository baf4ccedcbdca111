"""Moving digits: short clips of an 8x8 scikit-learn digit bouncing in a square canvas.

Each clip is one digit (from `apt_jax.data.digits`) pasted on a ``-1`` (black)
canvas of side ``canvas`` (default 12), moving with a constant integer velocity
per axis and bouncing off the borders. Everything is a pure function of
``(seed, index)``, so clip ``i`` is the same in every process, epoch and run,
and the set needs no files.

The motion rule. The digit's top-left corner moves on ``[0, L]``, ``L =
canvas - 8``, along each axis ``a``::

    corner_a(f) = bounce(start_a + velocity_a * f, L),
    bounce(u, L) = L - | (u mod 2L) - L |           # a triangle wave

with ``start_a`` uniform in ``{0, ..., L}`` and ``velocity_a`` uniform in
``{-max_speed, ..., -1, 1, ..., max_speed}`` (every clip moves on both axes).
``bounce`` reflects the straight path at ``0`` and ``L``: the digit touches the
border and comes back at the same speed. Positions are integers, so frames are
exact translates of the digit (no interpolation blur) and the digit is always
entirely inside the canvas.

A one-frame clip (``num_frames=1``) is an image: a digit at a random position,
which is what the image stage of the image-then-video schedule trains on.
"""

from __future__ import annotations

import numpy as np

from apt_jax.data.digits import IMAGE_SHAPE, NUM_CLASSES, load_digits_arrays

DIGIT_SIDE = IMAGE_SHAPE[0]
BACKGROUND = -1.0


def bounce(u: np.ndarray, length: int) -> np.ndarray:
    """Reflects positions ``u`` (any real values) into ``[0, length]`` (triangle wave).

    ``bounce(u) == u`` on ``[0, length]``; outside, the path folds back at each
    border, which is what a ball moving at constant speed between two walls does.
    """
    if length == 0:
        return np.zeros_like(np.asarray(u, dtype=np.float64))
    period = 2 * length
    return length - np.abs(np.mod(u, period) - length)


class MovingDigitsSource:
    """Random-access source of moving-digit clips, usable with ``grain.MapDataset.source``.

    ``source[i]`` is ``{"video": (num_frames, canvas, canvas, 1) float32 in [-1, 1],
    "label": int32 scalar}``. The source holds no open files (it pickles cheaply
    into grain workers) and computes each clip on demand in microseconds.

    Args:
      num_frames: frames per clip; 1 gives images as one-frame videos.
      canvas: side of the square frame, ``>= 8`` (the digit's side). The default 12
        gives the digit 5 places per axis at 36 tokens a frame with 2x2 patches.
      max_speed: the largest per-axis speed in pixels per frame.
      num_clips: the set's size (clips are drawn with replacement from the 1,797
        digits, so it may exceed it).
      seed: the set's seed; clip ``i`` depends on ``(seed, i)`` only.
    """

    num_classes = NUM_CLASSES

    def __init__(
        self,
        num_frames: int = 4,
        canvas: int = 12,
        max_speed: int = 2,
        num_clips: int = 16384,
        seed: int = 0,
    ):
        if num_frames < 1:
            raise ValueError(f"num_frames={num_frames} must be >= 1 (1 gives images).")
        if canvas < DIGIT_SIDE:
            raise ValueError(
                f"canvas={canvas} is smaller than the {DIGIT_SIDE}x{DIGIT_SIDE} digit; use "
                f"canvas >= {DIGIT_SIDE}."
            )
        if max_speed < 1:
            raise ValueError(f"max_speed={max_speed} must be >= 1 (every clip moves).")
        if num_clips < 1:
            raise ValueError(f"num_clips={num_clips} must be >= 1.")
        self.num_frames = num_frames
        self.canvas = canvas
        self.max_speed = max_speed
        self.num_clips = num_clips
        self.seed = seed
        self._digits, self._labels = load_digits_arrays()

    @property
    def travel(self) -> int:
        """``L``: the digit's corner moves on ``[0, L]`` along each axis."""
        return self.canvas - DIGIT_SIDE

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        return (self.num_frames, self.canvas, self.canvas, 1)

    def __len__(self) -> int:
        return self.num_clips

    def clip_parameters(self, index: int) -> dict[str, np.ndarray | int]:
        """What clip ``index`` is made of: ``digit`` (row of the digits set), ``label``,
        ``start`` and ``velocity`` (``(2,)`` int, (row, column) axes)."""
        index = int(index)
        if not 0 <= index < self.num_clips:
            raise IndexError(f"clip {index} outside [0, {self.num_clips}).")
        rng = np.random.default_rng([self.seed, index])
        digit = int(rng.integers(len(self._labels)))
        start = rng.integers(0, self.travel + 1, size=2)
        speeds = np.concatenate(
            [-np.arange(self.max_speed, 0, -1), np.arange(1, self.max_speed + 1)]
        )
        velocity = rng.choice(speeds, size=2)
        return {
            "digit": digit,
            "label": int(self._labels[digit]),
            "start": start,
            "velocity": velocity,
        }

    def corners(self, index: int) -> np.ndarray:
        """Top-left corner of the digit in each frame, int ``(num_frames, 2)`` (row, column)."""
        p = self.clip_parameters(index)
        frames = np.arange(self.num_frames)[:, None]
        return bounce(p["start"] + p["velocity"] * frames, self.travel).astype(np.int64)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        p = self.clip_parameters(index)
        video = np.full(self.video_shape, BACKGROUND, np.float32)
        digit = self._digits[p["digit"]]
        for f, (r, c) in enumerate(self.corners(index)):
            video[f, r : r + DIGIT_SIDE, c : c + DIGIT_SIDE] = digit
        return {"video": video, "label": np.int32(p["label"])}

    def clips(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """``(videos (N, F, S, S, 1), labels (N,))`` of the clips at ``indices``."""
        items = [self[i] for i in indices]
        return np.stack([x["video"] for x in items]), np.array([x["label"] for x in items])

    def __repr__(self) -> str:
        return (
            f"MovingDigitsSource(num_frames={self.num_frames}, canvas={self.canvas}, "
            f"max_speed={self.max_speed}, num_clips={self.num_clips}, seed={self.seed})"
        )
