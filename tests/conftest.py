"""Test-wide setup, before JAX starts a backend: 8 simulated CPU devices, and a
persistent compilation cache for this test session.

Many tests build the same tiny tasks afresh (a new `jax.jit` per task), and the
launch tests start processes that compile them again; XLA's persistent cache
(keyed by the program, the compile options and the jaxlib version) makes every
such compile after the first a read. The cache lives in a fresh temporary folder
per session, so no run reads another's entries; subprocesses inherit it through
the environment. A `JAX_COMPILATION_CACHE_DIR` set by the caller is kept.

Two tiers: `python -m pytest -m "not slow"` is the quick tier (the numerics, the
models, data, sharding, checkpoints and the error messages); the `slow` marker (see
pyproject.toml) takes every test that trains, spawns processes or runs a demo, and
CI runs both. A test that requests `teacher_dir`, which trains a run, is marked
slow here (`pytest_collection_modifyitems`), wherever it is written.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="apt_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    # Cache every program: most of the suite's compiles take under a second each.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


import pytest  # noqa: E402

# Session fixtures that train a run: any test that needs one, directly or through
# another fixture, is in the slow tier.
TRAINING_FIXTURES = frozenset({"teacher_dir"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINING_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A finished tiny SFT run (configs/digits_sft.py:tiny), shared by every recipe's tests."""
    from apt_jax.tasks import build_task
    from apt_jax.train.loop import train
    from configs import digits_sft

    workdir = tmp_path_factory.mktemp("teacher")
    config = digits_sft.get_config("tiny")
    config.eval.num_samples = 20
    config.eval.grid_rows = 2
    train(build_task(config), str(workdir))
    return str(workdir)


# The tiny SD3 pipeline's tests (tests/tiny_sd3.py: test_encode, test_sd3_end_to_end).
@pytest.fixture(scope="module")
def single_torch_thread():
    """torch on one thread for a module: the test machine's cores are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A tiny random StableDiffusion3Pipeline folder, saved offline (tests/tiny_sd3.py)."""
    import tiny_sd3

    return tiny_sd3.save_tiny_sd3(str(tmp_path_factory.mktemp("tiny_sd3")))
