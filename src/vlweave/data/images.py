"""Image files by content: a digest per file, and a decode check of every image a run will read.

:func:`file_digest` identifies an image by its bytes (BLAKE2b), memoised per process on (path, size, mtime, inode)
so a file is hashed once per run; the frozen-feature cache keys its entries by it, so an image replaced on disk is
never served its old features.  :func:`verify_images` fully decodes every image (in a thread pool: PIL's decoders
release the GIL) before any model is built and reports all failures in one error naming the data file, the record
and the image.  A digest that decoded once is remembered in the cache folder (``images/decoded.txt``), so a
second run on the same images only hashes them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vlweave.data.llava_json import MAX_LISTED, DataError

_DIGESTS: dict[tuple[str, int, int, int], str] = {}
_DECODED: set[str] | None = None


def file_digest(path: str | Path) -> str:
    """BLAKE2b-128 of a file's bytes (memoised on path, size, mtime and inode within the process)."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    digest = _DIGESTS.get(key)
    if digest is None:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
        digest = _DIGESTS[key] = h.hexdigest()
    return digest


def _decoded_file() -> Path:
    from vlweave import assets

    return assets.cache_dir() / "images" / "decoded.txt"


def _known_decoded() -> set[str]:
    global _DECODED
    if _DECODED is None:
        path = _decoded_file()
        _DECODED = set(path.read_text().split()) if path.is_file() else set()
    return _DECODED


def _remember(digests: Iterable[str]) -> None:
    new = [d for d in digests if d not in _known_decoded()]
    if not new:
        return
    _known_decoded().update(new)
    try:
        from filelock import FileLock

        path = _decoded_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"), open(path, "a") as fh:  # append-only: concurrent runs only add lines
            fh.write("".join(d + "\n" for d in new))
    except OSError:
        pass  # a read-only or full cache only costs a re-check next run


def _check_one(path: str) -> tuple[str | None, str | None]:
    """(digest, problem) for one image file."""
    from PIL import Image

    try:
        digest = file_digest(path)
    except OSError as exc:
        return None, f"cannot read image file: {exc.strerror or exc}"
    if digest in _known_decoded():
        return digest, None
    try:
        with Image.open(path) as im:
            im.load()
            if im.width < 1 or im.height < 1:
                return digest, "image has no pixels"
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        return digest, f"image does not decode ({type(exc).__name__}: {exc})"
    return digest, None


def verify_images(entries: Sequence[tuple[str, str]], source: str | Path, *, workers: int | None = None,
                  progress: bool = False) -> None:
    """Decode every image of ``entries`` (``(where, image_path)``: ``where`` names the record) and raise one
    :class:`DataError` naming ``source`` and every record whose image does not decode."""
    paths = sorted({p for _, p in entries})
    if not paths:
        return
    workers = workers or min(8, os.cpu_count() or 1)
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = dict(zip(paths, tqdm(pool.map(_check_one, paths), total=len(paths), desc="checking images",
                                       disable=not progress or len(paths) < 256, unit="img")))
    bad = {p: problem for p, (_, problem) in results.items() if problem}
    _remember(d for p, (d, problem) in results.items() if d and not problem)
    if bad:
        lines = [f"{where}: {p}: {bad[p]}" for where, p in entries if p in bad]
        shown = lines[:MAX_LISTED] + ([f"... and {len(lines) - MAX_LISTED} more"] if len(lines) > MAX_LISTED else [])
        raise DataError(f"{source}: {len(lines)} record(s) with an image that cannot be used:\n  " + "\n  ".join(shown))


def verify_sample_images(samples: Sequence, source: str | Path, *, progress: bool = False) -> None:
    """:func:`verify_images` for training samples (``id``, ``image``)."""
    verify_images([(f"record id {s.id!r}", s.image) for s in samples if s.image], source, progress=progress)


__all__ = ["file_digest", "verify_images", "verify_sample_images"]
