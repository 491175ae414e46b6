"""File I/O that fails loudly and names its file: disk-full errors, damaged weight files, undecodable text.

Everything vlweave writes that a later step depends on (checkpoints, ``final/``, the feature cache, predictions,
metrics) goes through :func:`disk_full_guard` or :func:`atomic_write_text`, so that "no space left on device"
becomes one :class:`DiskFullError` naming the path being written, and a half-written file never replaces a good
one.  Readers use :func:`read_text_file` (an undecodable byte is reported with its file, line and column, not as a
bare ``UnicodeDecodeError``) and :func:`verify_safetensors` (a truncated or empty weights file is reported as
damaged before any loader touches it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DiskFullError(OSError):
    """No space left while writing ``filename``; the message says what was kept."""


class DamagedFileError(ValueError):
    """A file that exists but cannot be what it claims to be (truncated weights, empty state file)."""


@contextlib.contextmanager
def disk_full_guard(path: str | Path, what: str, kept: str | None = None) -> Iterator[None]:
    """Turn ``ENOSPC``/``EDQUOT`` raised inside the block into a :class:`DiskFullError` naming ``path``.

    ``what``: what was being written ("checkpoint", "final model"); ``kept``: what is still good (the previous
    checkpoint), said in the message so the user knows nothing was lost."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not _is_disk_full(exc, Path(path)):
            raise
        tail = f"; {kept}" if kept else ""
        raise DiskFullError(errno.ENOSPC, f"{path}: no space left on device while writing the {what}{tail}",
                            str(path)) from None


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _is_disk_full(exc: BaseException, path: Path) -> bool:
    """ENOSPC/EDQUOT, or a writer's own error for it: safetensors says "No space left" / StorageFull; torch.save
    only says "file write failed", so a write error on a filesystem with (almost) no free space counts too."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left" in text or "StorageFull" in text or "ENOSPC" in text:
        return True
    if isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError":
        free = _free_bytes(path)
        return free is not None and free < (1 << 20)
    return False


def atomic_write_text(path: str | Path, text: str, what: str = "file") -> Path:
    """Write ``text`` to ``path`` through a temp file and a rename: readers see the old or the new file, never a
    prefix; a full disk raises :class:`DiskFullError` and leaves the old file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with disk_full_guard(path, what):
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | Path, data: Any, what: str = "file", **dumps: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, **dumps), what)


def decode_error_position(data: bytes, start: int) -> tuple[int, int]:
    """(line, column), both 1-based, of byte offset ``start`` in ``data``."""
    line = data.count(b"\n", 0, start) + 1
    column = start - (data.rfind(b"\n", 0, start) + 1) + 1
    return line, column


def read_text_file(path: str | Path, *, error: type[Exception] = ValueError) -> str:
    """A UTF-8 text file (a byte-order mark is allowed); a byte that is not UTF-8 (a latin-1 file, say) raises
    ``error`` naming the file, the line and column and the byte."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # utf-8-sig reports offsets after the byte-order mark
        offset = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line, column = decode_error_position(data, offset)
        byte = data[offset : offset + 1]
        raise error(f"{path}: not UTF-8 text at line {line}, column {column} (byte 0x{byte.hex()}: {exc.reason}); "
                    "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def verify_safetensors(path: str | Path) -> dict[str, Any]:
    """Check that a ``.safetensors`` file is complete without reading its tensors: the header parses and the
    file is exactly as long as the header says.  Returns the header; raises :class:`DamagedFileError` naming the
    file otherwise (an empty file, a truncated copy, a failed download)."""
    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(f"{path}: weights file missing")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise DamagedFileError(f"{path}: damaged weights file ({size} bytes; not a safetensors file)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise DamagedFileError(f"{path}: damaged weights file (truncated: header of {n} bytes, file {size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DamagedFileError(f"{path}: damaged weights file (unreadable header)") from None
    if not isinstance(header, dict):
        raise DamagedFileError(f"{path}: damaged weights file (unreadable header)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)),
              default=0)
    if 8 + n + end != size:
        raise DamagedFileError(f"{path}: damaged weights file (truncated: {size} bytes, the header describes "
                               f"{8 + n + end})")
    return header


__all__ = ["DamagedFileError", "DiskFullError", "atomic_write_json", "atomic_write_text", "decode_error_position",
           "disk_full_guard", "read_text_file", "verify_safetensors"]
