"""Train on a Cloud TPU pod slice: create it, install apt_jax on every worker, run one command.

  python launch/tpu_pod.py --name apt-pod --zone us-central2-b \
      --accelerator_type v4-32 --workdir gs://BUCKET/runs/sft -- \
      --config configs/sd3_sft.py:sd3-medium --config.init_from=gs://BUCKET/ckpt/sd3-medium \
      --config.data.data_dir=gs://BUCKET/data --config.data.dataset=mydata

Everything after `--` goes to `launch/train.py` unchanged, on every worker.
`--steps` (comma-separated, in this order; default create,setup,train):

  create  `gcloud compute tpus tpu-vm create`, or with --queued
          `gcloud compute tpus queued-resources create` and a wait until ACTIVE
  setup   ship the code to every worker (a `git archive` of this checkout's
          HEAD, or `git clone --repo`), `pip install -r requirements.txt -e .`,
          then the TPU build of the pinned jax and gcsfs (gs:// paths)
  train   `python3 launch/train.py --multihost=auto --workdir gs://... ARGS` on
          all workers at once (`--worker=all`): jax.distributed finds the slice
          by itself, every worker reads its shard of the data, orbax writes the
          checkpoints to the gs:// workdir, and running it again resumes
  delete  delete the slice (or the queued resource)

`--dry-run` prints every command (shell-quoted, one a line) and runs none.
The workdir must be on GCS: each worker has its own disk, and every worker
must restore the same checkpoint. Data (`config.data.data_dir`) and
`config.init_from` should be gs:// paths too, or present on every worker.
"""

import os
import re
import shlex
import subprocess
import sys
import time

# The installed apt_jax if there is one (`pip install .` or `-e .`), else this checkout's.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from apt_jax import cli  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("create", "setup", "train", "delete")

_NAME = flags.DEFINE_string("name", None, "TPU VM (node) name; also the queued resource's.")
_ZONE = flags.DEFINE_string("zone", None, "Zone, e.g. us-central2-b.")
_PROJECT = flags.DEFINE_string("project", None, "GCP project (default: gcloud's).")
_ACCELERATOR = flags.DEFINE_string("accelerator_type", "v4-8", "Slice type, e.g. v4-32, v5p-64.")
_RUNTIME = flags.DEFINE_string("runtime_version", "tpu-ubuntu2204-base", "TPU VM software.")
_QUEUED = flags.DEFINE_bool("queued", False, "Create through queued-resources (waits ACTIVE).")
_SPOT = flags.DEFINE_bool("spot", False, "Spot capacity (preemptible; SIGTERM saves, rerun).")
_REPO_URL = flags.DEFINE_string(
    "repo", None, "git URL to clone on the workers (default: ship this checkout's HEAD)."
)
_BRANCH = flags.DEFINE_string("branch", "main", "Branch or tag to clone with --repo.")
_REMOTE_DIR = flags.DEFINE_string("remote_dir", "apt_jax", "Checkout folder on the workers.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory, gs://BUCKET/...")
_STEPS = flags.DEFINE_list("steps", ["create", "setup", "train"], f"Steps among {STEPS}.")
_DRY_RUN = flags.DEFINE_bool("dry-run", False, "Print the commands instead of running them.")
flags.DEFINE_alias("dry_run", "dry-run")
_MULTIHOST_FLAG = flags.DEFINE_string(
    "multihost_flag",
    "--multihost=auto",
    "launch/train.py flag that makes it call jax.distributed.initialize() ('' for none).",
)
_JAX_TPU = flags.DEFINE_string(
    "jax_tpu", None, "pip spec of the TPU jax (default: jax[tpu]==<requirements.txt's jax>)."
)
_BACKGROUND = flags.DEFINE_bool(
    "background", False, "Detach training (nohup, log in ~/train.log on each worker)."
)
_POLL = flags.DEFINE_integer("poll_seconds", 30, "Queued resource: seconds between checks.")


def gcloud(*args: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", *args, f"--zone={_ZONE.value}"]
    if _PROJECT.value:
        cmd.append(f"--project={_PROJECT.value}")
    return cmd


def ssh_all(command: str) -> list[str]:
    return gcloud("tpu-vm", "ssh", _NAME.value, "--worker=all", f"--command={command}")


def jax_tpu_spec() -> str:
    """`jax[tpu]==X` for the jax version requirements.txt pins."""
    if _JAX_TPU.value:
        return _JAX_TPU.value
    with open(os.path.join(REPO, "requirements.txt")) as f:
        match = re.search(r"^jax==(\S+)", f.read(), re.MULTILINE)
    if not match:
        raise app.UsageError("requirements.txt pins no jax==X; pass --jax_tpu.")
    return f"jax[tpu]=={match.group(1)}"


def create_commands() -> list[list[str]]:
    spot = ["--spot"] if _SPOT.value else []
    if _QUEUED.value:
        return [
            gcloud(
                "queued-resources",
                "create",
                _NAME.value,
                f"--node-id={_NAME.value}",
                f"--accelerator-type={_ACCELERATOR.value}",
                f"--runtime-version={_RUNTIME.value}",
                *spot,
            )
        ]
    return [
        gcloud(
            "tpu-vm",
            "create",
            _NAME.value,
            f"--accelerator-type={_ACCELERATOR.value}",
            f"--version={_RUNTIME.value}",
            *spot,
        )
    ]


def queued_state_command() -> list[str]:
    return gcloud("queued-resources", "describe", _NAME.value, "--format=value(state.state)")


def setup_commands() -> list[list[str]]:
    d = shlex.quote(_REMOTE_DIR.value)
    pip = (
        f"cd {d} && python3 -m pip install -r requirements.txt -e . && "
        f"python3 -m pip install {shlex.quote(jax_tpu_spec())} gcsfs"
    )
    if _REPO_URL.value:
        clone = (
            f"rm -rf {d} && git clone --depth 1 --branch {shlex.quote(_BRANCH.value)} "
            f"{shlex.quote(_REPO_URL.value)} {d}"
        )
        return [ssh_all(f"{clone} && {pip}")]
    tarball = f"/tmp/apt_jax-{_NAME.value}.tar.gz"
    return [
        [
            "git",
            "-C",
            REPO,
            "archive",
            "--format=tar.gz",
            f"--prefix={_REMOTE_DIR.value}/",
            "-o",
            tarball,
            "HEAD",
        ],  # fmt: skip
        gcloud("tpu-vm", "scp", tarball, f"{_NAME.value}:apt_jax.tar.gz", "--worker=all"),
        ssh_all(f"rm -rf {d} && tar xzf apt_jax.tar.gz && {pip}"),
    ]


def train_command(train_args: list[str]) -> list[str]:
    args = [_MULTIHOST_FLAG.value] if _MULTIHOST_FLAG.value else []
    args += [f"--workdir={_WORKDIR.value}", *train_args]
    run = "python3 launch/train.py " + shlex.join(args)
    if _BACKGROUND.value:
        run = f"nohup {run} > ~/train.log 2>&1 &"
    return ssh_all(f"cd {shlex.quote(_REMOTE_DIR.value)} && {run}")


def delete_commands() -> list[list[str]]:
    if _QUEUED.value:
        return [gcloud("queued-resources", "delete", _NAME.value, "--force", "--quiet")]
    return [gcloud("tpu-vm", "delete", _NAME.value, "--quiet")]


def run(cmd: list[str]) -> None:
    print(shlex.join(cmd), flush=True)
    if not _DRY_RUN.value:
        subprocess.run(cmd, check=True)


def wait_until_active() -> None:
    """Polls the queued resource until ACTIVE (the slice exists and booted)."""
    cmd = queued_state_command()
    if _DRY_RUN.value:
        print(shlex.join(cmd) + "  # repeated until ACTIVE", flush=True)
        return
    while True:
        state = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
        print(f"queued resource {_NAME.value}: {state}", flush=True)
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED"):
            raise RuntimeError(f"Queued resource {_NAME.value} is {state}.")
        time.sleep(_POLL.value)


def check_flags(steps: list[str], train_args: list[str]) -> None:
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise app.UsageError(f"--steps has unknown step(s) {unknown}; use {STEPS}.")
    if not _NAME.value or not _ZONE.value:
        raise app.UsageError("--name and --zone are required.")
    if "train" in steps:
        if not _WORKDIR.value or not _WORKDIR.value.startswith("gs://"):
            raise app.UsageError(
                f"--workdir={_WORKDIR.value!r} must be a gs:// path: every worker restores and "
                "writes the same checkpoints."
            )
        if not any(a.startswith("--config") for a in train_args):
            raise app.UsageError(
                "Give launch/train.py's flags after `--`, e.g. -- --config configs/sd3_sft.py"
            )
        for a in train_args:
            if a.startswith(("--workdir", "--multihost")):
                raise app.UsageError(f"{a}: the launcher sets --workdir and --multihost itself.")
    for a in train_args:
        key, _, value = a.partition("=")
        if key in ("--config.data.data_dir", "--config.init_from") and value:
            if not value.startswith("gs://"):
                print(f"warning: {a} is not on GCS; it must exist on every worker.", flush=True)


def main(argv):
    train_args = argv[1:]  # absl leaves everything after `--` here
    steps = [s for s in STEPS if s in _STEPS.value]
    check_flags(_STEPS.value, train_args)
    if "create" in steps:
        for cmd in create_commands():
            run(cmd)
        if _QUEUED.value:
            wait_until_active()
    if "setup" in steps:
        if not _REPO_URL.value and not _DRY_RUN.value:
            dirty = subprocess.run(
                ["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            if dirty:
                print("warning: uncommitted changes are not shipped (git archive HEAD).")
        for cmd in setup_commands():
            run(cmd)
    if "train" in steps:
        run(train_command(train_args))
    if "delete" in steps:
        for cmd in delete_commands():
            run(cmd)


if __name__ == "__main__":
    cli.run(main)
