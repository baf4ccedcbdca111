"""The package layering: the training loop's contract never reaches into the recipes."""

import pkgutil
import subprocess
import sys

import pytest

import apt_jax.train


@pytest.mark.slow  # a fresh interpreter: this process has imported apt_jax.tasks already
def test_train_modules_import_without_tasks():
    modules = ["apt_jax.train"] + [
        f"apt_jax.train.{m.name}" for m in pkgutil.iter_modules(apt_jax.train.__path__)
    ]
    assert "apt_jax.train.task" in modules and "apt_jax.train.loop" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "    leaked = sorted(m for m in sys.modules if m.startswith('apt_jax.tasks'))\n"
        "    assert not leaked, f'{name} imports {leaked}'\n"
        "print('ok', len(sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")
