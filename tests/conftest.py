"""Test-wide setup: 8 simulated CPU devices, set before JAX starts a backend."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


import pytest  # noqa: E402


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
