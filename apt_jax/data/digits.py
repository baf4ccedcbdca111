"""The 8x8 handwritten digits set that scikit-learn ships, as a grain data source.

1,797 grayscale images of the digits 0-9, 8x8 pixels with integer values 0..16.
It comes with scikit-learn (no download), so every recipe can run end to end on
a laptop. Images are returned channels-last, ``(8, 8, 1)`` float32 scaled to
``[-1, 1]`` (``x / 8 - 1``), labels int32.
"""

from __future__ import annotations

import functools

import numpy as np

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
NUM_EXAMPLES = 1797


@functools.lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(images, labels)``: float32 ``(1797, 8, 8, 1)`` in ``[-1, 1]``, int32 ``(1797,)``.

    The arrays are cached and read-only; copy them before writing.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 8.0 - 1.0).reshape(-1, *IMAGE_SHAPE)
    labels = bunch.target.astype(np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


class DigitsSource:
    """Random-access source over the digits set, usable with ``grain.MapDataset.source``.

    ``source[i]`` is ``{"image": (8, 8, 1) float32 in [-1, 1], "label": int32 scalar}``.
    The source holds no open files, so it pickles cheaply into grain workers.
    """

    num_classes = NUM_CLASSES
    image_shape = IMAGE_SHAPE

    def __init__(self):
        self._images, self._labels = load_digits_arrays()

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        return {"image": self._images[index], "label": self._labels[index]}

    def __repr__(self) -> str:
        return f"DigitsSource(num_examples={len(self)})"
