"""The error a person fixes by changing what they typed, not the code."""

from __future__ import annotations


class UserError(ValueError):
    """A bad input the user can fix: an unknown or invalid config value, a missing
    run, a wrong path, a flag combination that cannot work.

    The message names the problem and the fix in one line. The launch scripts
    (`apt_jax.cli.run`) print it as `error: <message>` and exit with status 2,
    without a traceback; any other exception keeps its traceback. It subclasses
    `ValueError` so that code (and tests) catching `ValueError` keep working.
    """
