"""Frozen-feature cache: a frozen tower runs once per image, not once per epoch/stage/seed.

Stores the connector's *prepared* input of one named tower (its selected hidden states after the prefix strategy
and the connector's parameter-free ``prepare_tower``: pooling, Dense Connector fusion; before anything trainable)
per image *content* (a digest of the file's bytes), in memory and optionally on disk (one self-indexed
safetensors file per key under ``cache_dir()/features``, replaced atomically under a file lock), so repeated and
concurrent runs on the same images skip the tower entirely and a replaced image is never served stale features.

The key of a (tower, connector) pair is :func:`tower_cache_key`: the tower's config and facts, a fingerprint of its
weights, its transform, the layers the connector takes from it and the connector's prepare signature.
:class:`FeatureCache` is the one place that creates stores: one per tower the connector needs; towers it does not
need are never run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vlweave import assets
from vlweave.data.images import file_digest
from vlweave.safe_io import DamagedFileError, disk_full_guard, verify_safetensors
from vlweave.processing import load_image, tower_transform  # noqa: F401  (re-exported: older imports read it from here)
from vlweave.vision.towers import BASE_TOWER


# Entries keyed by image content in one self-indexed file (format 1 was keyed by path with a separate JSON index;
# its files get another key, so they are never read as this format).
CACHE_FORMAT = "content-v2"


@torch.no_grad()
def weights_fingerprint(module: torch.nn.Module) -> str:
    """A cheap identity of a module's weights (sum and sum of squares per tensor, in float64): the same config
    with other weights must not share a cache."""
    h = hashlib.sha256()
    for name, p in module.state_dict().items():
        if p.is_floating_point():
            x = p.detach().double()
            h.update(f"{name}:{tuple(p.shape)}:{float(x.sum()):.12e}:{float((x * x).sum()):.12e};".encode())
    return h.hexdigest()[:16]


def tower_cache_key(model, tower: str = BASE_TOWER) -> str:
    """Identity of what a store holds for ``tower``: config, facts, weights, transform, layers, prepare step."""
    spec = model.tower_specs[tower]
    # The config's ``dtype`` is a loading hint (None for a model built from a config, "float32" once saved and
    # loaded), not what runs: keying on it gave a reloaded checkpoint another store than the run that trained it.
    # The dtype the tower's weights actually have is keyed instead.
    config = {k: v for k, v in spec.config.to_dict().items() if k not in ("dtype", "torch_dtype")}
    weights = model.vision_towers[tower]
    desc = {
        "tower": tower,
        "config": config,
        "dtype": str(next(weights.parameters()).dtype),
        "facts": spec.facts.to_dict(),
        "layers": model.connector.tower_layers()[tower],
        "prepare": model.connector.prepare_signature(tower),
        "strategy": spec.select_strategy,
        "transform": spec.transform_desc(),
        "weights": weights_fingerprint(weights),
        "format": CACHE_FORMAT,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FeatureStore:
    """Image -> the prepared feature tensors [N, C] of one frozen tower (create through :class:`FeatureCache`).

    Entries are keyed by the image file's *content* (:func:`vlweave.data.images.file_digest`), not its path: an
    image replaced on disk gets new features, two paths to the same bytes share one entry.  On disk a store is ONE
    safetensors file (tensors named ``<digest>.<layer>``), written to a temp file and renamed, so a kill can never
    leave features paired with the wrong images; saving takes a file lock and merges what other runs added
    meanwhile, so concurrent runs on one cache lose nothing.
    """

    def __init__(
        self,
        model,
        transform: Callable[[Any], torch.Tensor],
        *,
        tower: str = BASE_TOWER,
        dtype: torch.dtype = torch.float32,
        persist: bool = True,
        batch_size: int = 64,
    ) -> None:
        self.model = model
        self.tower = tower
        self.transform = transform
        self.dtype = dtype
        self.batch_size = batch_size
        self.key = tower_cache_key(model, tower)
        self.path = assets.cache_dir() / "features" / f"{self.key}.safetensors" if persist else None
        self._by_digest: dict[str, list[torch.Tensor]] = {}  # content digest -> per-layer tensors
        self._feats: dict[str, list[torch.Tensor]] = {}  # image path -> the tensors of its current content
        self._path_digest: dict[str, str] = {}  # image path -> the digest its ``_feats`` entry was made from
        self._new: set[str] = set()  # digests computed here and not yet saved
        # Images asked for through ``ensure`` that were already there (memory or the on-disk cache) / that ran
        # the tower: the run's feature-cache hit rate (train_metrics.json).
        self.hits = 0
        self.misses = 0
        if self.path is not None and self.path.exists():
            self._by_digest.update(self._read(self.path))

    @staticmethod
    def _read(path: Path, warn: bool = True) -> dict[str, list[torch.Tensor]]:
        """The entries of a store file; a damaged file (truncated by a full disk, say) is ignored with a warning
        and rebuilt, never half-read."""
        try:
            verify_safetensors(path)
            data = load_file(str(path))
        except (DamagedFileError, OSError, SafetensorError) as exc:
            if warn:
                warnings.warn(f"{path}: feature cache file unreadable ({exc}); recomputing its features", stacklevel=3)
            return {}
        grouped: dict[str, dict[int, torch.Tensor]] = {}
        for name, t in data.items():
            digest, layer = name.rsplit(".", 1)
            grouped.setdefault(digest, {})[int(layer)] = t
        return {d: [layers[j] for j in range(len(layers))] for d, layers in grouped.items()}

    def save(self) -> None:
        if self.path is None or not self._new:
            return
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            on_disk = self._read(self.path, warn=False) if self.path.exists() else {}  # what others added
            merged = {**on_disk, **{d: self._by_digest[d] for d in self._new}}
            tensors = {f"{d}.{j}": t.contiguous() for d in sorted(merged) for j, t in enumerate(merged[d])}
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            with disk_full_guard(self.path, "feature cache"):
                try:
                    save_file(tensors, str(tmp), metadata={"format": CACHE_FORMAT})
                    os.replace(tmp, self.path)
                finally:
                    tmp.unlink(missing_ok=True)
            for d, layers in on_disk.items():
                self._by_digest.setdefault(d, layers)
        self._new.clear()

    def _current(self, path: str) -> tuple[str, bool]:
        """(digest of the file now, whether ``_feats[path]`` holds its features)."""
        digest = file_digest(path)
        if self._path_digest.get(path) != digest and digest in self._by_digest:
            self._feats[path], self._path_digest[path] = self._by_digest[digest], digest
        return digest, self._path_digest.get(path) == digest

    def __contains__(self, path: str) -> bool:
        try:
            return self._current(path)[1]
        except OSError:  # no such file (any more): nothing cached for it
            return False

    @torch.no_grad()
    def ensure(self, paths: Sequence[str], progress: bool = True, desc: str = "caching tower features") -> None:
        """Run the tower on every image whose current content is not cached yet (batched, with a progress bar)."""
        todo: dict[str, list[str]] = {}  # digest -> paths with that content
        wanted = sorted({p for p in paths if p is not None})
        for p in wanted:
            digest, ok = self._current(p)
            if not ok:
                todo.setdefault(digest, []).append(p)
        n_missing = sum(len(v) for v in todo.values())
        self.hits += len(wanted) - n_missing
        self.misses += n_missing
        if not todo:
            return
        self.model.eval()
        digests = list(todo)
        # float32 whatever autocast the caller runs under: a store's entries must not depend on who filled it
        # first (the trainer fills it outside autocast; evaluation may call ensure inside its bf16 region).
        bar = tqdm(total=len(digests), desc=desc, disable=not progress, unit="img")
        for start in range(0, len(digests), self.batch_size):
            chunk = digests[start : start + self.batch_size]
            pixels = torch.stack([self.transform(load_image(todo[d][0])) for d in chunk])
            with torch.autocast(next(self.model.parameters()).device.type, enabled=False):
                feats = self.model.prepare_tower_features(self.tower, pixels)
            for i, d in enumerate(chunk):
                # the cache lives in host RAM
                self._by_digest[d] = [f[i].to(device="cpu", dtype=self.dtype).clone() for f in feats]
                self._new.add(d)
                for p in todo[d]:
                    self._feats[p], self._path_digest[p] = self._by_digest[d], d
            bar.update(len(chunk))
        bar.close()
        self.save()

    def batch(self, paths: Sequence[str]) -> list[torch.Tensor]:
        """Stacked per-layer features [B, N, C] for the given image paths (an image changed on disk since it was
        cached is recomputed, never served stale features)."""
        stale = [p for p in paths if not self._current(p)[1]]
        if stale:
            self.ensure(stale, progress=False)
        rows = [self._feats[p] for p in paths]
        return [torch.stack([r[j] for r in rows]).float() for j in range(len(rows[0]))]


def stale_cache_files(folder: str | Path | None = None) -> list[tuple[Path, str]]:
    """Files under the feature cache folder (default ``cache_dir()/features``) that no current run reads, with the
    reason: stores of the earlier path-keyed format (``<key>.safetensors`` without this format's metadata, and
    their ``<key>.json`` index), damaged store files (a current run would rebuild them anyway) and temp files of
    interrupted writes.  Current-format stores are never listed: which keys a future run needs cannot be known."""
    folder = Path(folder) if folder is not None else assets.cache_dir() / "features"
    if not folder.is_dir():
        return []
    found: list[tuple[Path, str]] = []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            try:
                fmt = (verify_safetensors(path).get("__metadata__") or {}).get("format")
            except DamagedFileError as exc:
                found.append((path, f"damaged ({str(exc).split(': ', 1)[-1]})"))
                continue
            if fmt != CACHE_FORMAT:
                found.append((path, f"earlier cache format ({fmt or 'path-keyed'})"))
        elif path.suffix == ".json":
            found.append((path, "index of the earlier path-keyed format"))
        elif path.suffix == ".tmp":
            found.append((path, "temp file of an interrupted write"))
    return found


def prune_cache(folder: str | Path | None = None, *, dry_run: bool = False) -> tuple[list[tuple[Path, str]], int]:
    """Delete :func:`stale_cache_files` (``dry_run``: only list them); returns (the files, their bytes).  Each file
    is removed holding its store's lock (the lock a saving run holds while it writes its temp file and renames
    it), so nothing a running writer is using goes; a file whose lock is busy is kept and left out."""
    from filelock import FileLock, Timeout

    removed: list[tuple[Path, str]] = []
    total = 0
    for path, reason in stale_cache_files(folder):
        # Only files of this format can have a writer now: <key>.safetensors (damaged) and <key>.safetensors.<pid>.tmp
        ours = ".safetensors" in path.name and not reason.startswith("earlier")
        store = path.with_name(path.name.split(".", 1)[0] + ".safetensors")
        lock = FileLock(str(store) + ".lock", timeout=1) if ours else contextlib.nullcontext()
        try:
            with lock:
                if not path.exists():
                    continue
                size = path.stat().st_size
                if not dry_run:
                    path.unlink()
        except Timeout:
            continue  # a run is saving that store right now
        removed.append((path, reason))
        total += size
    return removed, total


class FeatureCache:
    """The frozen-feature stores of every tower a model's connector needs (or of ``towers``, e.g. only the frozen
    ones), keyed by tower name.

    Routed towers (``Connector.tower_rows``, e.g. MoVA's experts): :meth:`ensure` takes ``paths_by_tower`` so that
    a tower's store only computes the images routed to it, and :meth:`batch` takes ``rows`` so that it returns
    only those rows (the model zero-fills the others)."""

    def __init__(self, model, *, persist: bool = True, dtype: torch.dtype = torch.float32,
                 towers: Sequence[str] | None = None) -> None:
        names = [n for n in model.needed_towers() if towers is None or n in towers]
        self.stores: dict[str, FeatureStore] = {
            name: FeatureStore(model, tower_transform(model.tower_specs[name]), tower=name, persist=persist,
                               dtype=dtype)
            for name in names
        }

    @staticmethod
    def usable(model) -> bool:
        """Whether evaluation may read ``model``'s tower features from the cache: whenever it has a tower to run.

        Evaluation never changes weights, and a store's key holds a fingerprint of the tower's weights, so cached
        features are the ones the tower computes now -- whether or not its parameters ``requires_grad``.  (This
        used to test ``requires_grad``, which is False for a trained model's frozen towers but True for the same
        weights loaded from disk: ``vlweave eval`` then ran the tower from pixels inside the bf16 autocast while
        the end-of-training evaluation read fp32 features from the cache, and near-tie answers differed.)  The
        cache always computes features in float32 outside autocast (:meth:`FeatureStore.ensure`), as training
        with ``train.cache_features`` saw them."""
        return bool(model.needed_towers())

    def ensure(self, paths: Sequence[str], progress: bool = True,
               paths_by_tower: "dict[str, Sequence[str]] | None" = None) -> None:
        """Compute what is missing: ``paths`` for every store, or ``paths_by_tower[name]`` for a tower listed there."""
        for name, store in self.stores.items():
            wanted = paths if paths_by_tower is None or name not in paths_by_tower else paths_by_tower[name]
            store.ensure(wanted, progress, desc=f"caching tower features ({name})")

    def __contains__(self, path: str) -> bool:
        return all(path in store for store in self.stores.values())

    def hit_rate(self) -> dict[str, dict[str, float]]:
        """Per tower: images found cached / computed by ``ensure`` so far, and the hit rate."""
        return {name: {"hits": s.hits, "misses": s.misses,
                       "hit_rate": s.hits / (s.hits + s.misses) if s.hits + s.misses else 0.0}
                for name, s in self.stores.items()}

    def batch(self, paths: Sequence[str], rows: "dict[str, Any] | None" = None) -> dict[str, list[torch.Tensor]]:
        """Per tower: stacked prepared features [B, N, C] for ``paths`` (all must be cached).  A tower with
        ``rows[name]`` (image indices, not None) gets only those rows, in that order, and is left out when there
        are none."""
        out: dict[str, list[torch.Tensor]] = {}
        for name, store in self.stores.items():
            picked = None if rows is None else rows.get(name)
            if picked is None:
                out[name] = store.batch(paths)
            elif len(picked):
                out[name] = store.batch([paths[int(i)] for i in picked])
        return out
