"""apt_jax.cli: user errors as one line without a traceback, other errors with
theirs, INFO lines of orbax and friends in the workdir's log file, not on the console."""

import logging
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from apt_jax import cli
from apt_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One CPU device; JAX_PLATFORMS=cpu keeps an installed libtpu from probing for a TPU (its
# C++ start-up errors would reach the console this file checks).
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
TINY_SFT = os.path.join(REPO, "configs", "digits_sft.py") + ":tiny"
# absl's format for a log line: "I1201 21:13:21.900875 140379647142784 file.py:849] ..."
ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d", re.MULTILINE)


def launch(script, *args, cwd=None):
    cmd = [sys.executable, os.path.join(REPO, "launch", script), *map(str, args)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=cwd)


def assert_one_line_error(out, *fragments):
    """Exit status 2, stderr exactly one `error: ...` line holding every fragment."""
    assert out.returncode == cli.EXIT_USER_ERROR, (out.returncode, out.stderr[-3000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ------------------------------------------------------------- in process
def test_user_error_is_a_value_error():
    with pytest.raises(ValueError, match="name the fix"):
        raise UserError("name the fix")


def test_which_exceptions_are_user_errors(tmp_path):
    from apt_jax.convert.params_checkpoint import load_params

    assert cli.user_error_message(UserError("set --config.x=1.")) == "set --config.x=1."
    # A FileNotFoundError raised by apt_jax (here: a missing params checkpoint).
    with pytest.raises(FileNotFoundError, match="missing does not exist") as raised:
        load_params(str(tmp_path / "missing"))
    assert "missing does not exist" in cli.user_error_message(raised.value)
    # One raised inside a library, about a path nobody typed, is a bug: traceback.
    with pytest.raises(FileNotFoundError, match="elsewhere.npz") as raised:
        np.load(tmp_path / "elsewhere.npz")
    assert cli.user_error_message(raised.value) is None
    assert cli.user_error_message(RuntimeError("bug")) is None
    assert cli.user_error_message(ValueError("plain ValueError: not yet a UserError")) is None


def test_load_config_reads_a_recipe_file_with_variants(tmp_path):
    config = cli.load_config(
        os.path.join(REPO, "configs", "digits_distill.py"), "deterministic", ""
    )
    assert config.variant == "deterministic"
    tiny = cli.load_config(
        os.path.join(REPO, "configs", "digits_distill.py"), "deterministic", "tiny"
    )
    assert tiny.total_steps < config.total_steps
    with pytest.raises(UserError, match="No config file .*nope.py.*recipe under configs/"):
        cli.load_config(str(tmp_path / "nope.py"))


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def test_setup_logging_routes_info_to_the_file(tmp_path, capsys, restore_logging):
    path = cli.setup_logging(str(tmp_path / "run"), name="probe")
    assert path == str(tmp_path / "run" / "logs" / "probe.log")
    logging.getLogger("apt_jax.stages").info("[1/5] sft: training")
    logging.getLogger("absl").info("Saving checkpoint at step 3")  # orbax and grain log so
    logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
    logging.getLogger("jax._src.xla_bridge").warning("a library warning")
    for handler in logging.getLogger().handlers:
        handler.flush()
    console = capsys.readouterr().err
    assert console.splitlines() == [
        "[1/5] sft: training",
        "warning (jax._src.xla_bridge): a library warning",
    ]
    with open(path) as f:
        logged = f.read()
    for line in ("[1/5] sft: training", "Saving checkpoint at step 3", "backend 'tpu'"):
        assert line in logged


def test_setup_logging_verbosity_shows_every_library(tmp_path, capsys, restore_logging):
    cli.setup_logging(str(tmp_path), verbosity=0, name="probe")
    logging.getLogger("absl").info("Saving checkpoint at step 3")
    assert "Saving checkpoint at step 3" in capsys.readouterr().err


def test_setup_logging_does_not_create_a_run_it_only_reads(tmp_path, restore_logging):
    path = cli.setup_logging(str(tmp_path / "missing_run"), name="probe", create=False)
    assert not (tmp_path / "missing_run").exists()
    assert path is not None and path.endswith(os.path.join("apt_jax_logs", "probe.log"))


# ------------------------------------------------------------ subprocesses
@pytest.mark.slow
@pytest.mark.parametrize(
    "override, fragments",
    [
        # An unknown key, with the keys it might have meant.
        (
            "--config.model.num_layerz=3",
            ["--config.model.num_layerz", "no key 'model.num_layerz'", "--config.model.num_layers"],
        ),
        (
            "--config.nonexistent=3",
            ["no key 'nonexistent'", "the keys of config are", "total_steps"],
        ),
        # A value of the wrong type.
        (
            "--config.total_steps=abc",
            ["--config.total_steps=abc", "--config.total_steps takes an integer"],
        ),
    ],
)
def test_bad_config_override_is_one_line(tmp_path, override, fragments):
    out = launch("train.py", "--config", TINY_SFT, "--workdir", tmp_path / "run", override)
    assert_one_line_error(out, *fragments)


@pytest.mark.slow
def test_bad_config_file_is_one_line(tmp_path):
    out = launch("train.py", "--config", tmp_path / "nope.py", "--workdir", tmp_path / "run")
    assert_one_line_error(out, "cannot load the config file", "nope.py", "no such file")
    # A config that raises on an unknown variant: its message, and where it was raised.
    out = launch(
        "train.py", "--config", TINY_SFT.replace(":tiny", ":huge"), "--workdir", tmp_path / "run"
    )
    assert_one_line_error(out, "Unknown variant 'huge' of digits_sft", "digits_sft.py, line")


@pytest.mark.slow
def test_missing_flag_and_missing_run_are_one_line(tmp_path):
    assert_one_line_error(launch("train.py", "--config", TINY_SFT), "Flag --workdir must have")
    missing = tmp_path / "no_such_run"
    out = launch("sample.py", "--workdir", missing, "--out", tmp_path / "s.npz")
    assert_one_line_error(out, f"No checkpoint under {missing}", "train it first")
    assert not missing.exists()  # a mistyped run is not created
    out = launch("evaluate.py", "--samples", tmp_path / "absent.npz")
    assert_one_line_error(out, "No such file or directory", "absent.npz")
    # app.UsageError: one line, not absl's --help text.
    out = launch("evaluate.py", "--samples", tmp_path / "a.npz", "--name", "a", "--name", "b")
    assert_one_line_error(out, "Give one --name per --samples file.")


@pytest.mark.slow
def test_invalid_config_value_is_one_line(tmp_path):
    # apt_jax's config validation raises UserError.
    out = launch(
        "train.py", "--config", TINY_SFT, "--workdir", tmp_path / "run", "--config.ema_decay=1.5"
    )
    assert_one_line_error(out, "config.ema_decay=1.5 must be in [0, 1)")


SCRIPT = """
import sys

sys.path.insert(0, {repo!r})
from absl import flags

from apt_jax import cli
from apt_jax.errors import UserError

_RAISE = flags.DEFINE_enum("raise", "user", ["user", "bug"], "What main raises.")


def main(argv):
    if _RAISE.value == "user":
        raise UserError("--thing=3 is too big; use at most 2.")
    {{}}["missing"]  # a bug


if __name__ == "__main__":
    cli.run(main, workdir=lambda: {workdir!r}, create_workdir=True)
"""


@pytest.mark.slow
def test_user_error_versus_unexpected_exception(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT.format(repo=REPO, workdir=str(tmp_path / "wd"))))
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, script, *a], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert_one_line_error(run("--raise=user"), "--thing=3 is too big; use at most 2.")
    out = run("--raise=bug")
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr
    assert "KeyError: 'missing'" in out.stderr
    log_file = tmp_path / "wd" / "logs" / "script.log"
    assert f"The log: {log_file}" in out.stderr
    logged = log_file.read_text()
    assert "error: --thing=3 is too big" in logged and "KeyError: 'missing'" in logged


@pytest.mark.slow
def test_info_lines_go_to_the_log_file(teacher_dir, tmp_path):
    out = launch(
        "sample.py", "--workdir", teacher_dir, "--num", 4, "--steps", 1, "--out", tmp_path / "a"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    console = out.stdout + out.stderr
    assert not ABSL_LINE.search(console)
    assert console.strip().splitlines() == [
        f"Wrote 4 samples (1 steps, cfg 1.0, checkpoint 6) to {tmp_path / 'a.npz'}"
    ]
    with open(os.path.join(teacher_dir, "logs", "sample.log")) as f:
        logged = f.read()
    assert "checkpoint_manager.py" in logged  # orbax's INFO lines
    # --verbosity=0 shows them on the console too.
    out = launch(
        "sample.py", "--workdir", teacher_dir, "--num", 4, "--steps", 1, "--out", tmp_path / "b",
        "--verbosity=0",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint_manager.py" in out.stderr
