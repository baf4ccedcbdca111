"""launch/sample.py and launch/evaluate.py contracts, and the demo as a person runs it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One CPU device; JAX_PLATFORMS=cpu keeps an installed libtpu from probing for a TPU.
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def run_dir(teacher_dir):
    """The shared tiny SFT run (read only here)."""
    return teacher_dir


def launch(script, *args, cwd=None, console=False):
    cmd = [sys.executable, os.path.join(REPO, "launch", script), *map(str, args)]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return (out.stdout, out.stderr) if console else out.stdout


@pytest.mark.slow
def test_sample_and_evaluate_contract(run_dir, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    launch("sample.py", "--workdir", run_dir, "--num", 23, "--steps", 2, "--out", a, "--seed", 5)
    launch(
        "sample.py",
        "--workdir",
        run_dir,
        "--num",
        23,
        "--steps",
        2,
        "--out",
        b,
        "--seed",
        5,
        "--cfg",
        2.0,
    )
    with np.load(a) as fa, np.load(b) as fb:
        images, labels = fa["images"], fa["labels"]
        assert images.shape == (23, 8, 8, 1) and images.dtype == np.float32
        assert images.min() >= -1.0 and images.max() <= 1.0
        np.testing.assert_array_equal(labels, np.arange(23) % 10)
        assert not np.allclose(images, fb["images"])  # the guidance scale is used
    a2 = tmp_path / "a2.npz"
    launch("sample.py", "--workdir", run_dir, "--num", 23, "--steps", 2, "--out", a2, "--seed", 5)
    with np.load(a) as fa, np.load(a2) as fa2:
        np.testing.assert_array_equal(fa["images"], fa2["images"])  # --seed fixes the noise

    stdout = launch("evaluate.py", "--samples", a, "--samples", b, "--out_dir", tmp_path)
    assert "| a |" in stdout and "| b |" in stdout
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in rows] == ["a", "b"]
    assert rows[0]["num_samples"] == 23 and 0.0 <= rows[0]["accuracy"] <= 1.0
    assert (tmp_path / "results.md").exists()


@pytest.mark.slow
def test_demo(tmp_path):
    """launch/demo.py --tiny from another folder: the stages, the table, the pictures,
    and a console of a line per stage (orbax's INFO lines in the log file)."""
    workdir = tmp_path / "demo"
    stdout, stderr = launch(
        "demo.py", "--tiny", "--workdir", workdir, "--num_samples", 20, cwd=tmp_path, console=True
    )
    rows = json.loads((workdir / "results.json").read_text())
    names = ["teacher_25_steps", "teacher_1_step", "deterministic_1_step", "apt_approx_r1_1_step"]
    assert [r["name"] for r in rows] == names
    assert all(name in stdout for name in names)
    assert all(np.isfinite(r["frechet_distance"]) for r in rows)
    assert all(r["num_samples"] == 20 for r in rows)
    # Each row's metrics are means over the three default noise seeds, which differ.
    for r in rows:
        per_seed = r["frechet_distance_seeds"]
        assert len(per_seed) == 3 and len(set(per_seed)) == 3
        assert np.isclose(r["frechet_distance"], np.mean(per_seed))
        assert np.isclose(r["accuracy"], np.mean(r["accuracy_seeds"]))
    assert (workdir / "teacher_1_step.png").exists() and (workdir / "results.md").exists()
    # Four rows of ten 8x8 digits, upscaled 4x with 1-pixel padding.
    comparison = np.asarray(Image.open(workdir / "comparison.png"))
    assert comparison.shape[:2] == (4 * 33 + 1, 10 * 33 + 1)
    # The console: a line per stage, then the table (tiny configs show no bars).
    stage_lines = [line for line in stderr.splitlines() if line.strip()]
    assert [line.split(" ", 2)[:2] for line in stage_lines] == [
        ["[1/5]", "sft:"],
        ["[2/5]", "targets:"],
        ["[3/5]", "deterministic:"],
        ["[4/5]", "apt:"],
        ["[5/5]", "evaluate:"],
    ], stderr[-3000:]
    assert len(stdout.strip().splitlines()) == 2 + len(names)
    assert "checkpoint_manager.py" in (workdir / "logs" / "demo.log").read_text()

    # Again: every stage kept, the table redone with the first run's stage seconds.
    seconds = json.loads((workdir / "stage_seconds.json").read_text())
    _, stderr = launch(
        "demo.py", "--tiny", "--workdir", workdir, "--num_samples", 20, cwd=tmp_path, console=True
    )
    assert stderr.count("finished earlier") == 3 and "targets.npz exists, kept" in stderr
    assert json.loads((workdir / "stage_seconds.json").read_text()) == seconds
    rerun = json.loads((workdir / "results.json").read_text())
    assert [r["stage_seconds"] for r in rerun if "stage_seconds" in r] == [
        r["stage_seconds"] for r in rows if "stage_seconds" in r
    ]
