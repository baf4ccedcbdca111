"""A `gs://` workdir: every run output reaches the bucket, through `etils.epath`.

An in-memory fsspec filesystem stands in for GCS: epath (without TensorFlow)
serves `gs://` with fsspec's `gcs` implementation, which the `bucket` fixture
replaces. A write that bypassed epath (`open`, `os.makedirs`, PIL's
`save(path)`) would create a local folder `gs:` in the working directory
instead, which every test checks is absent.
"""

import io
import json
import os
import struct

import fake_gcs
import numpy as np
import pytest
from fsspec.registry import _registry
from PIL import Image

from apt_jax.eval.grid import image_grid, save_png_grid, write_results
from apt_jax.paths import as_path, is_local
from apt_jax.train.metrics_writer import MetricWriter

RUN = "gs://bucket/run"


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """An empty fake bucket; the cwd is an empty temp folder (to catch local writes)."""
    for name in fake_gcs.PROTOCOLS:
        monkeypatch.setitem(_registry, name, fake_gcs.FakeGCS)
    fake_gcs.reset()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield fake_gcs.FakeGCS.store
    fake_gcs.reset()
    assert os.listdir(cwd) == [], "something was written to a local folder instead"


def _events(data: bytes):
    """The `Event` protos of a TensorBoard event file (TFRecord framing: u64 length,
    u32 crc, payload, u32 crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        out.append(Event.FromString(data[pos + 12 : pos + 12 + length]))
        pos += 12 + length + 4
    return out


def test_paths():
    assert is_local("runs/a") and is_local(os.path.abspath("a")) and not is_local(RUN)
    assert os.fspath(as_path(RUN) / "eval") == RUN + "/eval"
    # Local paths are made absolute (orbax needs absolute paths).
    assert os.fspath(as_path("runs/a") / "eval") == os.path.join(os.path.abspath("runs/a"), "eval")


def test_metric_writer_uploads_and_resumed_run_appends(bucket, tmp_path):
    writer = MetricWriter(RUN)
    writer.write_scalars(2, {"loss": np.float32(0.5)})
    # Uploaded at every write, not only at close (a preempted run keeps its logs).
    lines = fake_gcs.objects(RUN)["metrics.jsonl"].decode().splitlines()
    assert [json.loads(x) for x in lines] == [{"step": 2, "loss": 0.5}]
    writer.write_scalars(4, {"loss": 0.25, "lr": 1e-3})
    writer.close()
    writer = MetricWriter(RUN)  # a resumed run: appends to the bucket's metrics.jsonl
    writer.write_scalars(6, {"loss": 0.125})
    writer.close()

    files = fake_gcs.objects(RUN)
    assert [json.loads(x) for x in files["metrics.jsonl"].decode().splitlines()] == [
        {"step": 2, "loss": 0.5},
        {"step": 4, "loss": 0.25, "lr": 1e-3},
        {"step": 6, "loss": 0.125},
    ]
    events = sorted(k for k in files if k.startswith("tensorboard/events"))
    assert len(events) == 2  # one event file per run, as on a local disk
    scalars = sorted(
        (e.step, v.tag, v.simple_value)
        for name in events
        for e in _events(files[name])
        for v in e.summary.value
    )
    expected = [(2, "loss", 0.5), (4, "loss", 0.25), (4, "lr", 1e-3), (6, "loss", 0.125)]
    assert [(s, t) for s, t, _ in scalars] == [(s, t) for s, t, _ in expected]
    np.testing.assert_allclose([v for *_, v in scalars], [v for *_, v in expected], rtol=1e-6)


def test_grid_and_results_reach_the_bucket(bucket):
    images = np.linspace(-1, 1, 6 * 4 * 4).reshape(6, 4, 4, 1)
    grid = save_png_grid(images, RUN + "/eval/grid.png", nrow=3, upscale=2)
    png = fake_gcs.objects(RUN)["eval/grid.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)))[..., None], grid)
    np.testing.assert_array_equal(grid, image_grid(images, nrow=3, upscale=2))

    md = write_results(
        [{"name": "a", "fd": np.float32(1.5)}], as_path(RUN) / "r.json", RUN + "/sub/r.md"
    )
    files = fake_gcs.objects(RUN)
    assert json.loads(files["r.json"]) == [{"name": "a", "fd": 1.5}]
    assert files["sub/r.md"].decode() == md


def test_local_writers_unchanged(tmp_path, monkeypatch):
    """Local paths (relative ones too) are written in place, as before."""
    monkeypatch.chdir(tmp_path)
    writer = MetricWriter("run")
    writer.write_scalars(1, {"loss": 2.0})
    writer.close()
    assert open("run/metrics.jsonl").read() == '{"step": 1, "loss": 2.0}\n'
    assert any(f.startswith("events") for f in os.listdir("run/tensorboard"))
    grid = save_png_grid(np.zeros((2, 3, 3)), "run/eval/g.png", nrow=2)
    np.testing.assert_array_equal(np.asarray(Image.open("run/eval/g.png"))[..., None], grid)
    write_results({"a": 1}, "run/r.json", "run/r.md")
    assert json.load(open("run/r.json")) == {"a": 1}


@pytest.mark.slow
def test_training_run_in_a_bucket_writes_what_a_local_run_writes(
    bucket, teacher_dir, monkeypatch, tmp_path
):
    """The tiny SFT run of `teacher_dir`, repeated with `--workdir gs://...`.

    Orbax writes arrays with tensorstore, which cannot reach the fake bucket, so
    the checkpoints alone go to a local folder; every other output must land in
    the bucket, byte for byte what the local run wrote (the timing-dependent
    `steps_per_second` aside).
    """
    from apt_jax.tasks import build_task
    from apt_jax.train import loop
    from configs import digits_sft

    real = loop.Checkpointer
    local_ckpt = str(tmp_path / "ckpt")

    def checkpointer(workdir, **kwargs):
        assert os.fspath(workdir) == RUN
        return real(local_ckpt, **kwargs)

    monkeypatch.setattr(loop, "Checkpointer", checkpointer)
    config = digits_sft.get_config("tiny")  # as in conftest.teacher_dir
    config.eval.num_samples = 20
    config.eval.grid_rows = 2
    results = loop.train(build_task(config), RUN)

    files = fake_gcs.objects(RUN)
    step = config.total_steps
    local = lambda name: open(os.path.join(teacher_dir, name), "rb").read()
    png = f"eval/samples_step{step}.png"
    assert files[png] == local(png)
    final = f"eval/metrics_step{step}.json"
    assert json.loads(files[final]) == json.loads(local(final))
    assert json.loads(files[final])["step"] == results["step"] == step

    def rows(text):
        out = [json.loads(x) for x in text.decode().splitlines()]
        return [{k: v for k, v in r.items() if k != "steps_per_second"} for r in out]

    assert rows(files["metrics.jsonl"]) == rows(local("metrics.jsonl"))
    assert any(k.startswith("tensorboard/events") for k in files)
    assert not any(k.startswith("checkpoints") for k in files)


_LAUNCH_IN_FAKE_BUCKET = """
import os, runpy, sys
sys.path.insert(0, {tests!r})
import fake_gcs

fake_gcs.install()


def launch(script, *args):
    sys.argv = [script, *args]
    try:
        runpy.run_path(os.path.join({repo!r}, "launch", script), run_name="__main__")
    except SystemExit as e:  # absl's app.run exits
        assert not e.code, e.code


common = ["--workdir", {workdir!r}, "--num", "12", "--steps", "2", "--seed", "5"]
launch("sample.py", *common, "--out", "gs://bucket/s/a.npz", "--grid", "gs://bucket/s/a.png")
launch("sample.py", *common, "--out", {local!r})
launch("evaluate.py", "--samples", "gs://bucket/s/a.npz")
fake_gcs.dump("gs://bucket", {dump!r})
"""


@pytest.mark.slow
def test_sample_and_evaluate_scripts_take_bucket_paths(teacher_dir, tmp_path):
    """launch/sample.py writes `--out`/`--grid` to gs://, launch/evaluate.py reads
    `--samples` from there and writes results.{json,md} next to them; the
    samples equal those of a local `--out`."""
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    cwd, dump, local = tmp_path / "cwd", tmp_path / "bucket", tmp_path / "local"
    cwd.mkdir()
    code = _LAUNCH_IN_FAKE_BUCKET.format(
        tests=tests,
        repo=os.path.dirname(tests),
        workdir=teacher_dir,
        local=str(local),
        dump=str(dump),
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert os.listdir(cwd) == []  # nothing went to a local folder named gs:
    assert sorted(os.listdir(dump / "s")) == ["a.npz", "a.png", "results.json", "results.md"]
    # np.savez's ".npz" suffix rule is kept for local --out paths.
    with np.load(dump / "s" / "a.npz") as remote, np.load(tmp_path / "local.npz") as here:
        assert remote["images"].shape == (12, 8, 8, 1)
        np.testing.assert_array_equal(remote["images"], here["images"])
        np.testing.assert_array_equal(remote["labels"], np.arange(12) % 10)
        png = np.asarray(Image.open(dump / "s" / "a.png"))[..., None]
        np.testing.assert_array_equal(png, image_grid(remote["images"], nrow=10, upscale=4))
    rows = json.loads((dump / "s" / "results.json").read_text())
    assert [r["name"] for r in rows] == ["a"] and rows[0]["num_samples"] == 12
