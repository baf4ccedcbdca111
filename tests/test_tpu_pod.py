"""launch/tpu_pod.py: the gcloud commands its dry run prints, and its refusals."""

import os
import shlex
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test starts launch/tpu_pod.py as a process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD = [
    "--name=pod1",
    "--zone=us-central2-b",
    "--accelerator_type=v4-32",
    "--workdir=gs://bucket/runs/sft",
    "--dry-run",
]
TRAIN_ARGS = [
    "--config",
    "configs/sd3_sft.py:sd3-medium",
    "--config.init_from=gs://bucket/ckpt/sd3-medium",
    "--config.data.data_dir=gs://bucket/data",
    "--config.data.dataset=my data",  # a space: must survive the remote shell
]
ZONE = "--zone=us-central2-b"


def launcher(*args):
    cmd = [sys.executable, os.path.join(REPO, "launch", "tpu_pod.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def dry_run(*args):
    out = launcher(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if not line.startswith("warning")]
    return [shlex.split(line, comments=True) for line in lines]


def remote(cmd):
    """The shell command a `gcloud ... ssh --command=...` runs on the workers, split."""
    (command,) = [a.removeprefix("--command=") for a in cmd if a.startswith("--command=")]
    return command


def test_dry_run_prints_create_setup_train_delete():
    cmds = dry_run(*POD, "--steps=create,setup,train,delete", "--", *TRAIN_ARGS)
    assert len(cmds) == 6
    create, archive, scp, setup, train, delete = cmds
    assert create == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "pod1",
        "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", ZONE,
    ]  # fmt: skip
    assert archive == [
        "git", "-C", REPO, "archive", "--format=tar.gz", "--prefix=apt_jax/",
        "-o", "/tmp/apt_jax-pod1.tar.gz", "HEAD",
    ]  # fmt: skip
    assert scp == [
        "gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/apt_jax-pod1.tar.gz",
        "pod1:apt_jax.tar.gz", "--worker=all", ZONE,
    ]  # fmt: skip
    assert setup[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1", "--worker=all"]
    assert remote(setup) == (
        "rm -rf apt_jax && tar xzf apt_jax.tar.gz && cd apt_jax && python3 -m pip install "
        "-r requirements.txt -e . && python3 -m pip install 'jax[tpu]==0.10.2' gcsfs"
    )
    assert train[:7] == setup[:7] and train[-1] == ZONE
    # The remote shell sees launch/train.py with the launcher's flags, then the
    # user's, each one argument (the dataset name keeps its space).
    shell = shlex.split(remote(train))
    assert shell[:3] == ["cd", "apt_jax", "&&"]
    assert shell[3:] == [
        "python3",
        "launch/train.py",
        "--multihost=auto",
        "--workdir=gs://bucket/runs/sft",
        *TRAIN_ARGS,
    ]
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod1", "--quiet", ZONE]


def test_dry_run_queued_resources_and_clone():
    cmds = dry_run(
        *POD,
        "--queued",
        "--spot",
        "--project=proj",
        "--repo=https://example.com/apt_jax.git",
        "--branch=v1",
        "--steps=create,setup,delete",
    )
    create, wait, setup, delete = cmds
    p = "--project=proj"
    assert create == [
        "gcloud", "compute", "tpus", "queued-resources", "create", "pod1", "--node-id=pod1",
        "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot", ZONE, p,
    ]  # fmt: skip
    assert wait == [
        "gcloud", "compute", "tpus", "queued-resources", "describe", "pod1",
        "--format=value(state.state)", ZONE, p,
    ]  # fmt: skip
    assert remote(setup).startswith(
        "rm -rf apt_jax && git clone --depth 1 --branch v1 https://example.com/apt_jax.git "
        "apt_jax && cd apt_jax && python3 -m pip install -r requirements.txt -e ."
    )
    assert delete == [
        "gcloud", "compute", "tpus", "queued-resources", "delete", "pod1", "--force", "--quiet",
        ZONE, p,
    ]  # fmt: skip


def test_background_train_only():
    (train,) = dry_run(*POD, "--steps=train", "--background", "--", "--config=configs/x.py")
    assert remote(train) == (
        "cd apt_jax && nohup python3 launch/train.py --multihost=auto "
        "--workdir=gs://bucket/runs/sft --config=configs/x.py > ~/train.log 2>&1 &"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir=/local/run", "--steps=train", "--", "--config=c.py"], "must be a gs:// path"),
        (["--steps=train"], "after `--`"),
        (["--steps=train", "--", "--config=c.py", "--workdir=gs://x"], "sets --workdir"),
        (["--steps=create,boot"], "unknown step"),
    ],
)
def test_refuses_bad_invocations(args, message):
    out = launcher(*POD, *args)  # a later --workdir replaces POD's
    assert out.returncode != 0
    assert message in out.stderr
