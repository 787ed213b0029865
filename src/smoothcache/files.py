"""Reading and writing smoothcache's files: atomic writes, and JSON reads that fail with our own errors.

A write goes to a temporary file beside the target and replaces it only once complete and on disk,
so a crash or a full disk midway leaves the old file as it was, never half of a new one.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .errors import SmoothCacheError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "read_json", "shown", "strict_json"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it when the block ends without an error.

    For writers that want a path rather than bytes; the temporary name keeps ``path``'s suffix, so
    writers that pick the format from it still do.

    >>> with atomic_path("figure.png") as tmp:          # doctest: +SKIP
    ...     fig.savefig(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _reserve(path)
    try:
        yield tmp
        with open(tmp, "rb+") as written:  # the writer closed (and so flushed) it; now make it durable
            os.fsync(written.fileno())
        if path.exists():  # keep the old file's permissions, as writing over it in place would
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, creating parent folders; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically, creating parent folders; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _reserve(path: Path) -> Path:
    """Create an empty, new temporary file beside ``path`` (with the umask's permissions, unlike mkstemp's 0600)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable where the system allows syncing a folder (POSIX)."""
    if os.name != "posix":
        return
    with suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_json(path: str | Path, error: type[SmoothCacheError], what: str) -> Any:
    """The JSON in ``path``; anything that keeps it from being read raises ``error`` naming the file.

    ``what`` names the kind of file in the messages, e.g. ``"schedule"``. The bytes are decoded
    here, so a file that is not UTF-8 fails like any other unreadable file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"Cannot read {what} file {path}: {exc.strerror or exc}") from exc
    kind = what.capitalize()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{kind} file {path} is not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x}); is it a {what} JSON file?") from exc
    except json.JSONDecodeError as exc:
        raise error(f"{kind} file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    except RecursionError as exc:
        raise error(f"{kind} file {path} nests lists or objects too deeply to be a {what}") from exc
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise error(f"{kind} file {path} is not usable JSON: {exc}") from exc


def shown(value: object) -> str:
    """``repr(value)`` cut short for an error message; safe for huge integers and deep nesting."""
    if isinstance(value, int) and value.bit_length() > 128:  # repr fails past 4300 digits, and says nothing past 40
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    try:
        return reprlib.repr(value)
    except (ValueError, RecursionError):
        return f"a {type(value).__name__} too large to show"


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinity as None, so that it is strict JSON (a number that is not
    one becomes null); objects with ``as_dict()`` are written as that dict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    as_dict = getattr(value, "as_dict", None)
    return strict_json(as_dict()) if callable(as_dict) else value
