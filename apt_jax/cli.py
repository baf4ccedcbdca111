"""The console of every launch script: what a person reads, and one line per user error.

`run(main)` replaces `absl.app.run(main)` in `launch/*.py`:

- Logging goes to a file, `<workdir>/logs/<script>.log` (`setup_logging`); the
  console shows the progress bars, apt_jax's own lines (one per demo stage,
  resumes, warnings), other libraries' warnings and what the script prints.
  orbax, grain and tfds log every checkpoint step and file at INFO, and their
  warnings are bookkeeping ("Given directory is read only"): those reach the
  console only as errors. absl's `--verbosity` (`-v`) shows every library's
  lines on the console from that level: 0 INFO, 1 DEBUG, -1 WARNING.
- A user error prints `error: <one line naming the fix>` and exits with status
  2, without a traceback: `apt_jax.errors.UserError`, a `FileNotFoundError`
  raised in apt_jax or the script (a missing run, a bad path), `app.UsageError`,
  and a bad flag, including an unknown `--config.key`, a value of the wrong type
  and a config file that does not exist or does not load.
- Any other exception keeps its traceback, followed by the log file's path
  (status 1). Ctrl-C exits 130 with one line (running a training command
  again resumes from its last checkpoint).

`load_config` reads a recipe file as `--config path:variant` would, and
`recipes` a folder of them, for the launch scripts that assemble several
recipes (the demos).
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import is_config_flag
from tqdm import tqdm

import apt_jax
from apt_jax.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

_PACKAGE_DIR = os.path.dirname(os.path.abspath(apt_jax.__file__)) + os.sep
# Libraries that log bookkeeping at INFO and WARNING: in the file; on the
# console from ERROR (or from --verbosity).
_QUIET_PACKAGES = ("orbax", "grain", "tensorflow_datasets", "array_record", "etils")
_FILE_FORMAT = (
    "%(asctime)s %(levelname).1s %(process)d %(name)s %(filename)s:%(lineno)d] %(message)s"
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ logging
def _main_file() -> str | None:
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return os.path.abspath(path) if path else None


def _is_ours(record: logging.LogRecord) -> bool:
    """Logged by apt_jax or the running script (absl.logging calls land on the
    'absl' logger, so the file decides)."""
    if record.name == "apt_jax" or record.name.startswith(("apt_jax.", "__main__")):
        return True
    path = os.path.abspath(record.pathname)
    return path.startswith(_PACKAGE_DIR) or path == _main_file()


def _is_quiet(record: logging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, "/")
    return any(f"/{package}/" in path for package in _QUIET_PACKAGES) or record.name.startswith(
        _QUIET_PACKAGES
    )


class _ConsoleFilter(logging.Filter):
    """Without --verbosity: ours from INFO, quiet libraries from ERROR, the rest
    from WARNING. With it: everything from its level."""

    def __init__(self, level: int | None):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if self.level is not None:
            return record.levelno >= self.level
        if _is_ours(record):
            return record.levelno >= logging.INFO
        return record.levelno >= (logging.ERROR if _is_quiet(record) else logging.WARNING)


class _ConsoleFormatter(logging.Formatter):
    """apt_jax's INFO lines as they are; warnings and errors with their level (and
    their logger, when not ours)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno <= logging.INFO and _is_ours(record):
            return message
        source = "" if _is_ours(record) else f" ({record.name})"
        return f"{record.levelname.lower()}{source}: {message}"


class _ConsoleHandler(logging.Handler):
    """Writes through `tqdm.write`, so a line logged while a progress bar runs
    prints above the bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _absl_level(verbosity: int) -> int:
    """absl's -v level (1 DEBUG, 0 INFO, -1 WARNING, -2 ERROR) as a logging level."""
    if verbosity >= 1:
        return logging.DEBUG - (verbosity - 1)
    return absl_logging.converter.absl_to_standard(verbosity)


def _log_file(workdir: str | None, name: str, create: bool) -> str | None:
    """`<workdir>/logs/<name>.log` for a local workdir that exists (or is to be
    created), else one under the temp folder; None if neither can be written."""
    candidates = []
    if workdir and "://" not in workdir and (create or os.path.isdir(workdir)):
        candidates.append(os.path.join(os.path.abspath(workdir), "logs"))
    # A bucket workdir, a missing run or no workdir: this machine's temp folder.
    candidates.append(os.path.join(tempfile.gettempdir(), "apt_jax_logs"))
    for folder in candidates:
        try:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{name}.log")
            with open(path, "a", encoding="utf-8"):
                return path
        except OSError:
            continue
    return None


def setup_logging(
    workdir: str | None,
    verbosity: int | None = None,
    *,
    name: str | None = None,
    create: bool = True,
) -> str | None:
    """Sends logging to `<workdir>/logs/<name>.log` and a readable part to the console.

    Replaces absl's stderr handler on the root logger (and any earlier call's
    handlers); Python warnings are logged too.

    Args:
      workdir: the run's folder. A bucket path (`gs://...`), None, or a folder
        that does not exist while `create` is False (a run that is only read)
        log under `<tmp>/apt_jax_logs/` instead.
      verbosity: absl's `-v` level for the console: every library's lines from
        that level (0 INFO, 1 DEBUG, -1 WARNING). None: apt_jax's INFO lines,
        others' warnings, orbax / grain / tfds errors only.
      name: the file's stem (default: the running script's).
      create: create `workdir` if it does not exist.

    Returns:
      The log file's path (None if no file could be opened: console only).
    """
    name = name or os.path.splitext(os.path.basename(sys.argv[0] or "apt_jax"))[0] or "apt_jax"
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler is absl_logging.get_absl_handler() or getattr(handler, "_apt_jax_cli", False):
            root.removeHandler(handler)
            if isinstance(handler, logging.FileHandler):
                handler.close()
    console_level = None if verbosity is None else _absl_level(verbosity)
    file_level = min(logging.INFO, console_level or logging.INFO)

    console = _ConsoleHandler()
    console.addFilter(_ConsoleFilter(console_level))
    console.setFormatter(
        logging.Formatter(_FILE_FORMAT) if verbosity is not None else _ConsoleFormatter()
    )
    handlers: list[logging.Handler] = [console]
    path = _log_file(workdir, name, create)
    if path is not None:
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setLevel(file_level)
        file_handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        handlers.append(file_handler)
    for handler in handlers:
        handler._apt_jax_cli = True
        root.addHandler(handler)
    root.setLevel(file_level)
    # absl's logger follows the root's level (orbax and grain log through it).
    absl_logging.get_absl_logger().setLevel(logging.NOTSET)
    logging.captureWarnings(True)
    if path is not None:
        started = f"{' '.join(sys.argv)} (apt_jax {apt_jax.__version__} from {_PACKAGE_DIR})"
        file_handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, started, (), None))
    return path


# ------------------------------------------------------------------- errors
def _innermost_file(error: BaseException) -> str:
    tb = error.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename)


def user_error_message(error: BaseException) -> str | None:
    """The one line to print for `error` if the user can fix it, else None."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, app.UsageError):
        return str(error)
    if isinstance(error, FileNotFoundError):
        # Raised by apt_jax or the script (a missing run, a bad path), or about a
        # path given on the command line; elsewhere in a library it is a bug, and
        # keeps its traceback.
        where = _innermost_file(error)
        if where.startswith(_PACKAGE_DIR) or where == _main_file():
            return str(error)
        if error.filename and _given_on_command_line(os.fspath(error.filename)):
            return f"{error.strerror or 'No such file or directory'}: {error.filename}"
    return None


def _given_on_command_line(path: str) -> bool:
    """Whether `path` is, or lies under, a value given in sys.argv."""
    path = os.path.abspath(path) if "://" not in path else path
    for arg in sys.argv[1:]:
        value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
        if not value or value.startswith("-"):
            continue
        value = os.path.abspath(value) if "://" not in value else value.rstrip("/")
        if path == value or path.startswith(value + "/"):
            return True
    return False


def _flag_error_line(error: flags.Error) -> str:
    """absl's flag error as one line: `--flag=value: what is wrong`.

    A config file that raised while loading (absl puts its traceback in the
    message) becomes its last line, with the file and line it was raised at.
    """
    lines = [line for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    first = first[len("flag ") :] if first.startswith("flag --") else first
    if len(lines) == 1:
        match = re.match(r"--(\w+)\.([\w.]+)=", first)
        if match and f"{match.group(1)}.{match.group(2)}" in flags.FLAGS:
            # A config key's value of the wrong type: say which type it takes.
            field = flags.FLAGS[f"{match.group(1)}.{match.group(2)}"]
            kind = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(
                field.parser.flag_type(), f"a {field.parser.flag_type()}"
            )
            return f"{first} (--{field.name} takes {kind})"
        return first
    head = re.match(r"(--\S+?): ", first)
    cause = re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1].strip())
    places = re.findall(r'File "([^"]+)", line (\d+)', str(error))
    place = f" ({places[-1][0]}, line {places[-1][1]})" if places else ""
    return f"{head.group(1) if head else first}: {cause}{place}"


def _config_flag_frame(error: BaseException) -> dict[str, Any] | None:
    """The locals of ml_collections' `_ConfigFlag._parse` where `error` was raised
    while it applied `--config.key=value` overrides (ml_collections 1.1)."""
    tb = error.__traceback__
    found = None
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "_parse" and is_config_flag(owner):
            found = dict(frame.f_locals)
        tb = tb.tb_next
    return found


def _unknown_key_line(flag_name: str, argument: str, field_path: str, config: Any) -> str:
    """`--config.a.b: <file> has no key 'a.b'; did you mean ...` (or its keys)."""
    node, seen = config, []
    for part in field_path.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            where = ".".join([flag_name, *seen])
            return (
                f"--{flag_name}.{field_path}: {where} is a value, not a group of keys; "
                f"override it as --{where}=VALUE."
            )
        keys = list(node.keys())
        if part not in keys:
            prefix = ".".join([flag_name, *seen])
            close = difflib.get_close_matches(part, keys, n=3)
            hint = (
                "did you mean " + " or ".join(f"--{prefix}.{k}" for k in close) + "?"
                if close
                else f"the keys of {prefix} are {', '.join(sorted(keys))}."
            )
            missing = ".".join([*seen, part])
            return f"--{flag_name}.{field_path}: {argument} has no key {missing!r}; {hint}"
        node = node[part]
        seen.append(part)
    return f"--{flag_name}.{field_path}: cannot override this key of {argument}."


def _config_load_line(flag_name: str, argument: str) -> str:
    path = argument.split(":", 1)[0]
    return (
        f"--{flag_name}={argument}: cannot load the config file {path!r} (no such file); "
        "give a recipe file, e.g. --config configs/digits_sft.py."
    )


def _loads(config: Any) -> bool:
    """False for ml_collections' stand-in for a config file that failed to load."""
    try:
        getattr(config, "keys", None)
    except OSError:
        return False
    return True


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every flag and config error turned into a `UserError`."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        raise UserError(_flag_error_line(e)) from None
    except (AttributeError, KeyError, IndexError, OSError) as e:
        frame = _config_flag_frame(e)
        if frame is None:
            raise
        name, argument = frame["self"].name, str(frame.get("argument"))
        if not _loads(frame.get("config")):
            raise UserError(_config_load_line(name, argument)) from None
        if isinstance(e, OSError) or "field_path" not in frame:
            raise
        raise UserError(
            _unknown_key_line(name, argument, frame["field_path"], frame["config"])
        ) from None
    # A config file that does not exist only fails when first read: check now.
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if is_config_flag(flag) and flag.present and not _loads(flag.value):
            raise UserError(_config_load_line(name, config_flags.get_config_filename(flag)))
    return rest


def run(
    main: Callable[[list[str]], Any],
    *,
    workdir: Callable[[], str | None] | flags.FlagHolder | None = None,
    create_workdir: bool = False,
) -> None:
    """`app.run(main)` with the console and user errors described in the module docstring.

    Args:
      main: the script's `main(argv)`.
      workdir: the folder whose `logs/` receives the log file (a flag holder or a
        function called after the flags are parsed); None logs under the temp folder.
      create_workdir: create that folder if missing (a training run); False for
        scripts that only read a run, so a mistyped path is not created.
    """

    def logged_main(argv: list[str]) -> Any:
        folder = workdir() if callable(workdir) else getattr(workdir, "value", None)
        verbosity = flags.FLAGS.verbosity if flags.FLAGS["verbosity"].present else None
        setup_logging(folder, verbosity, create=create_workdir)
        try:
            return main(argv)
        except app.UsageError as e:  # absl would print the whole --help text
            raise UserError(str(e)) from e

    try:
        app.run(logged_main, flags_parser=_parse_flags)
    except KeyboardInterrupt:
        _to_log_file(logging.WARNING, "Interrupted.")
        print("Interrupted.", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:
        message = user_error_message(e)
        if message is not None:
            _to_log_file(logging.ERROR, f"error: {message}")
            print(f"error: {message}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        path = _to_log_file(logging.ERROR, "Unexpected error:", exc_info=e)
        traceback.print_exception(e)
        if path:
            print(f"The log: {path}", file=sys.stderr)
        sys.exit(1)


def _to_log_file(level: int, message: str, exc_info: BaseException | None = None) -> str | None:
    """Writes one record to the log file alone (the console shows it its own way);
    returns the file's path (None before `setup_logging`)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and getattr(handler, "_apt_jax_cli", False):
            info = (type(exc_info), exc_info, exc_info.__traceback__) if exc_info else None
            handler.handle(log.makeRecord(log.name, level, __file__, 0, message, (), info))
            return handler.baseFilename
    return None


# ------------------------------------------------------------------ configs
def load_config(path: str, *variants: str) -> ml_collections.ConfigDict:
    """`get_config(",".join(variants))` of the config file at `path`, as
    `--config path:variant,...` would load it (empty variants are left out).

    Raises:
      UserError: `path` is not a file.
    """
    if not os.path.isfile(path):
        raise UserError(f"No config file {path!r}: give the path of a recipe under configs/.")
    stem = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"configs.{stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(",".join(v for v in variants if v))


def recipes(folder: str, *variants: str) -> Callable[..., ml_collections.ConfigDict]:
    """`recipe(name, *more)`: `load_config(<folder>/<name>.py, *more, *variants)`,
    e.g. `recipes("configs", "tiny")("digits_distill", "deterministic")`."""

    def recipe(name: str, *more: str) -> ml_collections.ConfigDict:
        return load_config(os.path.join(folder, f"{name}.py"), *more, *variants)

    return recipe
