"""Tests for Frechet distance, the digits classifier and the grid/results writers."""

import json

import numpy as np
import pytest
from PIL import Image

from apt_jax.data.digits import load_digits_arrays
from apt_jax.eval.grid import image_grid, results_table_markdown, save_png_grid, write_results
from apt_jax.eval.metrics import (
    DigitsClassifier,
    digits_frechet_distance,
    evaluate_digits,
    frechet_distance,
    gaussian_statistics,
    get_digits_classifier,
)


def halves(seed=0):
    images, labels = load_digits_arrays()
    perm = np.random.default_rng(seed).permutation(len(labels))
    a, b = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    return (images[a], labels[a]), (images[b], labels[b])


# ---- Frechet distance -----------------------------------------------------


def test_gaussian_statistics():
    x = np.random.default_rng(0).normal(size=(500, 3)).astype(np.float32)
    mu, cov = gaussian_statistics(x)
    assert mu.dtype == np.float64 and cov.dtype == np.float64
    assert mu.shape == (3,) and cov.shape == (3, 3)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0))
    np.testing.assert_allclose(cov, np.cov(x.astype(np.float64).T))
    with pytest.raises(ValueError, match="need at least 2 samples for a covariance; got 1"):
        gaussian_statistics(x[:1])


@pytest.mark.parametrize(
    "m1, s1, m2, s2", [(0.0, 1.0, 0.0, 1.0), (1.0, 2.0, -0.5, 0.5), (3, 0, 0, 1)]
)
def test_frechet_1d_closed_form(m1, s1, m2, s2):
    fd = frechet_distance([m1], [[s1**2]], [m2], [[s2**2]])
    assert fd == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, abs=1e-10)


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 2, size=5), rng.uniform(0.1, 2, size=5)
    s1[0] = 0.0  # a singular covariance
    fd = frechet_distance(m1, np.diag(s1**2), m2, np.diag(s2**2))
    assert fd == pytest.approx(np.sum((m1 - m2) ** 2) + np.sum((s1 - s2) ** 2), rel=1e-10)


def test_frechet_rotation_invariant_and_symmetric():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    c1, c2 = a @ a.T, b @ b.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    fd = frechet_distance(mu1, c1, mu2, c2)
    assert fd == pytest.approx(frechet_distance(mu2, c2, mu1, c1), rel=1e-9)
    assert fd == pytest.approx(
        frechet_distance(q @ mu1, q @ c1 @ q.T, q @ mu2, q @ c2 @ q.T), rel=1e-9
    )
    # Against the textbook formula with scipy's sqrtm.
    from scipy import linalg

    ref = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert fd == pytest.approx(ref, rel=1e-7)


def test_frechet_near_singular_is_real_nonnegative():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 64))  # rank 9 covariance in 64-d
    mu, cov = gaussian_statistics(x)
    fd = frechet_distance(mu, cov, mu, cov)
    assert isinstance(fd, float) and 0.0 <= fd < 1e-8


def test_digits_frechet_sanity():
    images, _ = load_digits_arrays()
    assert digits_frechet_distance(images) == pytest.approx(0.0, abs=1e-8)
    (a, _), (b, _) = halves()
    fd_half = digits_frechet_distance(a)
    mu_a, cov_a = gaussian_statistics(a.reshape(len(a), -1))
    mu_b, cov_b = gaussian_statistics(b.reshape(len(b), -1))
    fd_halves = frechet_distance(mu_a, cov_a, mu_b, cov_b)
    noise = np.random.default_rng(0).normal(size=images.shape).astype(np.float32)
    fd_noise = digits_frechet_distance(noise)
    assert fd_half < 0.2 and fd_halves < 0.5
    assert fd_noise > 20.0 and fd_noise > 50 * fd_halves


def test_digits_frechet_clips_samples():
    images, _ = load_digits_arrays()
    overshoot = np.where(images > 0, 3.0, -3.0) * np.abs(images)
    np.testing.assert_allclose(
        digits_frechet_distance(overshoot), digits_frechet_distance(np.clip(overshoot, -1, 1))
    )
    with pytest.raises(ValueError, match=r"expected digits images shaped .*got \(4, 7, 7, 1\)"):
        digits_frechet_distance(np.zeros((4, 7, 7, 1)))


# ---- classifier -----------------------------------------------------------


def test_classifier_held_out_accuracy():
    for seed in (0, 1):
        (xa, ya), (xb, yb) = halves(seed)
        clf = DigitsClassifier.fit(xa, ya)
        assert clf.accuracy(xb, yb) >= 0.97


def test_fixed_classifier_and_evaluate():
    images, labels = load_digits_arrays()
    clf = get_digits_classifier()
    assert get_digits_classifier() is clf
    pred = clf.predict(images[:10])
    assert pred.shape == (10,) and pred.dtype == np.int32
    assert clf.accuracy(images, labels) >= 0.99
    result = evaluate_digits(images, labels)
    assert set(result) == {"frechet_distance", "accuracy", "num_samples"}
    assert result["num_samples"] == 1797 and result["accuracy"] >= 0.99
    assert result["frechet_distance"] == pytest.approx(0.0, abs=1e-8)
    noise = np.random.default_rng(0).uniform(-1, 1, size=(200, 8, 8, 1))
    bad = evaluate_digits(noise, labels[:200])
    assert bad["accuracy"] < 0.5 and bad["frechet_distance"] > 20
    assert evaluate_digits(images[:100])["accuracy"] is None


# ---- grids and results ----------------------------------------------------


def test_image_grid_shape_and_values():
    images = np.stack([np.full((8, 8, 1), v, np.float32) for v in (-1.0, 0.0, 1.0, 2.0, -5.0)])
    grid = image_grid(images, nrow=3, padding=1, upscale=2)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * (16 + 1) + 1, 3 * (16 + 1) + 1, 1)
    assert grid[1, 1, 0] == 0 and grid[1, 18, 0] == 128 and grid[1, 35, 0] == 255
    assert grid[18, 1, 0] == 255 and grid[18, 18, 0] == 0  # clipped
    assert grid[0].max() == 0  # padding
    rgb = image_grid(np.zeros((4, 5, 6, 3)), nrow=2, padding=0)
    assert rgb.shape == (10, 12, 3)


def test_save_png_grid(tmp_path):
    images, _ = load_digits_arrays()
    path = tmp_path / "sub" / "grid.png"
    grid = save_png_grid(images[:20], path, nrow=5, upscale=4)
    img = Image.open(path)
    assert img.mode == "L" and img.size == (grid.shape[1], grid.shape[0])
    assert img.size == (5 * 33 + 1, 4 * 33 + 1)
    np.testing.assert_array_equal(np.asarray(img), grid[..., 0])
    rgb_path = tmp_path / "rgb.png"
    save_png_grid(np.random.default_rng(0).uniform(-1, 1, (3, 4, 4, 3)), rgb_path, nrow=3)
    assert Image.open(rgb_path).mode == "RGB"


def test_results_markdown_and_files(tmp_path):
    rows = [
        {"recipe": "sft", "steps": 25, "frechet_distance": np.float64(1.23456), "accuracy": 0.9},
        {"recipe": "apt|1", "steps": 1, "frechet_distance": 0.5, "seeds": [0.41234, 0.5]},
    ]
    md = results_table_markdown(rows, ["recipe", "steps", "frechet_distance", "accuracy", "seeds"])
    lines = md.strip().split("\n")
    assert lines[0] == "| recipe | steps | frechet_distance | accuracy | seeds |"
    assert lines[1].count("---") == 5
    assert lines[2] == "| sft | 25 | 1.235 | 0.9 |  |"
    assert lines[3] == "| apt\\|1 | 1 | 0.5 |  | 0.4123 / 0.5 |"
    assert results_table_markdown(rows).startswith(
        "| recipe | steps | frechet_distance | accuracy | seeds |"
    )

    json_path, md_path = tmp_path / "r.json", tmp_path / "r.md"
    out = write_results(rows, json_path, md_path)
    assert md_path.read_text() == out
    loaded = json.loads(json_path.read_text())
    assert loaded[0]["frechet_distance"] == pytest.approx(1.23456) and loaded[1]["steps"] == 1
    write_results({"accuracy": np.float32(0.5), "arr": np.arange(2)}, json_path, md_path)
    assert json.loads(json_path.read_text()) == {"accuracy": 0.5, "arr": [0, 1]}
    assert "| accuracy | arr |" in md_path.read_text()
