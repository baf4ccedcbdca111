"""PNG sample grids and JSON/Markdown results tables."""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from apt_jax.paths import as_path


def image_grid(
    images: np.ndarray, nrow: int, padding: int = 1, upscale: int = 1, pad_value: int = 0
) -> np.ndarray:
    """Tiles ``images (N, H, W, C)`` in ``[-1, 1]`` into one uint8 image.

    ``nrow`` is the number of images per row (as in torchvision's ``make_grid``);
    the grid has ``ceil(N / nrow)`` rows, unfilled cells stay ``pad_value``.
    Values are clipped to ``[-1, 1]`` and mapped to ``0..255``. Each image is
    upscaled by pixel repetition (``upscale``), then separated by ``padding``
    pixels, also around the border. ``C`` must be 1 (grayscale, returned as
    ``(H', W', 1)``) or 3 (RGB); ``(N, H, W)`` is read as grayscale.
    Returns ``(nrows * (H*upscale + padding) + padding, ncols * (W*upscale + padding)
    + padding, C)`` uint8.
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, 1|3) or (N, H, W); got {x.shape}.")
    if nrow < 1 or upscale < 1 or padding < 0:
        raise ValueError(
            f"need nrow >= 1, upscale >= 1, padding >= 0; got {nrow}, {upscale}, {padding}."
        )
    n, h, w, c = x.shape
    x = np.round((np.clip(np.nan_to_num(x), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    if upscale > 1:
        x = x.repeat(upscale, axis=1).repeat(upscale, axis=2)
        h, w = h * upscale, w * upscale
    ncols = min(nrow, max(n, 1))
    nrows = max(math.ceil(n / nrow), 1)
    grid = np.full(
        (nrows * (h + padding) + padding, ncols * (w + padding) + padding, c),
        pad_value,
        dtype=np.uint8,
    )
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = x[i]
    return grid


def save_png_grid(
    images: np.ndarray, path: str | os.PathLike, nrow: int, upscale: int = 4, padding: int = 1
) -> np.ndarray:
    """Writes ``image_grid(images, nrow, padding, upscale)`` to ``path`` as PNG and returns it.

    Grayscale grids are written in Pillow mode ``"L"``, colour ones in ``"RGB"``.
    Parent directories are created. ``path`` may be local or a URI (``gs://...``).
    """
    from PIL import Image

    grid = image_grid(images, nrow=nrow, padding=padding, upscale=upscale)
    # A 2-D uint8 array becomes mode "L", (H, W, 3) uint8 becomes "RGB".
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    buffer = io.BytesIO()  # encoded in memory: bucket objects are written whole
    img.save(buffer, format="PNG")
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return grid


def save_video_strips(
    videos: np.ndarray, path: str | os.PathLike, upscale: int = 4, padding: int = 1
) -> np.ndarray:
    """Writes clips ``(N, F, H, W, C)`` in ``[-1, 1]`` as one PNG, a clip per row and a
    frame per column (time runs left to right); returns the grid."""
    x = np.asarray(videos)
    if x.ndim != 5:
        raise ValueError(f"videos must be (N, F, H, W, C); got {x.shape}.")
    return save_png_grid(
        x.reshape(-1, *x.shape[2:]), path, nrow=x.shape[1], upscale=upscale, padding=padding
    )


def save_video_gif(
    videos: np.ndarray,
    path: str | os.PathLike,
    nrow: int,
    upscale: int = 4,
    padding: int = 1,
    frame_ms: int = 200,
) -> list[np.ndarray]:
    """Writes clips ``(N, F, H, W, 1)`` in ``[-1, 1]`` as an animated GIF: frame ``f``
    of the GIF is the grid (``nrow`` clips per row) of every clip's frame ``f``.

    Loops forever, ``frame_ms`` per frame. Returns the ``F`` grids (uint8).
    """
    from PIL import Image

    x = np.asarray(videos)
    if x.ndim != 5 or x.shape[-1] != 1:
        raise ValueError(f"videos must be grayscale clips (N, F, H, W, 1); got {x.shape}.")
    grids = [
        image_grid(x[:, f], nrow=nrow, padding=padding, upscale=upscale) for f in range(x.shape[1])
    ]
    frames = [Image.fromarray(g[..., 0]) for g in grids]
    buffer = io.BytesIO()
    frames[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=frames[1:],
        duration=frame_ms,
        loop=0,
    )
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return grids


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):  # e.g. a metric's value per seed
        return " / ".join(_format_cell(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def results_table_markdown(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None
) -> str:
    """A Markdown table with one line per row dict; floats to 4 significant digits,
    lists as their values joined by " / ".

    (Floats of magnitude >= 1e4 are printed without decimals; ``None`` is blank.)

    ``columns`` picks and orders the columns (default: keys in first-seen order);
    missing values are blank.
    """
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    columns = list(columns)
    lines = [
        "| " + " | ".join(_format_cell(c) for c in columns) + " |",
        "|" + "|".join(" --- " for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _to_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__array__") and hasattr(value, "shape"):  # jax arrays
        return np.asarray(value).tolist()
    return value


def write_results(
    results: list[dict[str, Any]] | dict[str, Any],
    json_path: str | os.PathLike,
    md_path: str | os.PathLike,
    columns: Sequence[str] | None = None,
) -> str:
    """Writes ``results`` (one dict or a list of row dicts) as JSON and as a Markdown table.

    numpy / jax scalars and arrays are converted to plain JSON values. Paths may be
    local or URIs (``gs://...``); parent directories are created. Returns the
    Markdown text.
    """
    rows = [results] if isinstance(results, dict) else list(results)
    rows = [_to_json(r) for r in rows]
    json_path, md_path = as_path(json_path), as_path(md_path)
    for path in (json_path, md_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    payload = rows[0] if isinstance(results, dict) else rows
    json_path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    markdown = results_table_markdown(rows, columns)
    md_path.write_text(markdown)
    return markdown
