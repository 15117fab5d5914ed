"""Writing and reading the files a run leaves behind, safely (DESIGN invariant 8).

Every file the library writes goes through :func:`write_text` / :func:`write_json` / :func:`write_bytes`: the
content goes to a temporary file in the same directory, which is then renamed over the target (atomic on POSIX),
so a killed process never leaves a half-written file that looks complete. :func:`check_writable_dir` checks an
output directory *before* any work is done, and :func:`read_json` turns a missing or truncated file into one
clear error naming the file and what to do.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = write_json(d / "a.json", {"x": 1})
    >>> read_json(d / "a.json", what="results")
    {'x': 1}
    >>> try:
    ...     check_writable_dir(d / "a.json", "--out")  # doctest: +ELLIPSIS
    ... except ConfigError as e:
    ...     print(str(e).split(";")[0])
    --out: ... is an existing file, not a directory
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from vlpeft_jax.errors import ConfigError, InputError


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a plain open() would honour the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import (os.umask is process-wide: reading it later could race other threads)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Writes ``obj`` as JSON to ``path`` atomically (floats of numpy/jax types become Python floats)."""
    return write_text(path, json.dumps(obj, indent=indent, default=float) + "\n")


def read_json(path: str | os.PathLike, *, what: str = "file", hint: str = "") -> Any:
    """Reads JSON, or raises :class:`InputError` naming the file, what is wrong and ``hint`` (what to do)."""
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist{tail}") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a directory, not a JSON file{tail}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{what} {path} is not valid JSON ({e}){tail}") from None


def check_writable_dir(path: str | os.PathLike, name: str) -> Path:
    """Checks that ``path`` can be (or already is) a directory this process can write into, before any work.

    Raises:
      ConfigError: ``path`` is an existing file, or it (or its nearest existing parent) is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{name}: {path} is an existing file, not a directory; choose a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{name}: {path} cannot be created ({probe} is a file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{name}: {probe} is not writable; choose another directory")
    return path
