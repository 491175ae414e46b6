"""Frozen-feature cache: a frozen tower runs once per image, not once per epoch/stage/seed.

Stores the connector's *prepared* input (selected hidden states after the CLS strategy and the connector's
parameter-free ``prepare``: pooling, Dense Connector fusion; before anything trainable) per image
path, in memory and optionally on disk (one safetensors file per (tower, transform, layers) key under
``cache_dir()/features``), so repeated runs on the same images skip the tower entirely.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vlweave import assets


def load_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read image: {exc}") from None


def cache_key(model, transform_desc: dict) -> str:
    """Identity of what the cache stores: tower weights' config + input transform + selected layers."""
    cfg = model.config
    desc = {
        "vision": cfg.vision_config.to_dict(),
        "image_size": model.facts.image_size,
        "layers": model.connector.feature_layers(),
        "prepare": model.connector.prepare_signature(),
        "strategy": cfg.vision_feature_select_strategy,
        "transform": transform_desc,
        # A cheap fingerprint of the weights: the same config with other weights must not share a cache.
        "weights": float(sum(p.double().sum() for p in list(model.vision_tower.parameters())[:4])),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FeatureStore:
    """Image path -> list of per-layer feature tensors [N, C] for a frozen tower."""

    def __init__(
        self,
        model,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        transform_desc: dict,
        dtype: torch.dtype = torch.float32,
        persist: bool = True,
        batch_size: int = 64,
    ) -> None:
        self.model = model
        self.transform = transform
        self.dtype = dtype
        self.batch_size = batch_size
        self.key = cache_key(model, transform_desc)
        self.path = assets.cache_dir() / "features" / f"{self.key}.safetensors" if persist else None
        self._feats: dict[str, list[torch.Tensor]] = {}
        self._dirty = False
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        data = load_file(str(self.path))
        index = json.loads(self.path.with_suffix(".json").read_text())
        for i, p in enumerate(index["paths"]):
            self._feats[p] = [data[f"{i}.{j}"] for j in range(index["num_layers"])]

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        paths = sorted(self._feats)
        tensors = {f"{i}.{j}": t.contiguous() for i, p in enumerate(paths) for j, t in enumerate(self._feats[p])}
        tmp = self.path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(self.path)
        num_layers = len(next(iter(self._feats.values()))) if self._feats else 0
        self.path.with_suffix(".json").write_text(json.dumps({"paths": paths, "num_layers": num_layers}))
        self._dirty = False

    def __contains__(self, path: str) -> bool:
        return path in self._feats

    @torch.no_grad()
    def ensure(self, paths: Sequence[str], progress: bool = True, desc: str = "caching tower features") -> None:
        """Run the tower on every image not yet cached (batched, with a progress bar)."""
        missing = sorted({p for p in paths if p is not None and p not in self._feats})
        if not missing:
            return
        self.model.eval()
        bar = tqdm(total=len(missing), desc=desc, disable=not progress, unit="img")
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            pixels = torch.stack([self.transform(load_image(p)) for p in chunk])
            feats = self.model.vision_features(pixels)
            for i, p in enumerate(chunk):
                self._feats[p] = [f[i].to(device="cpu", dtype=self.dtype).clone() for f in feats]  # cache lives in host RAM
            bar.update(len(chunk))
        bar.close()
        self._dirty = True
        self.save()

    def batch(self, paths: Sequence[str]) -> list[torch.Tensor]:
        """Stacked per-layer features [B, N, C] for the given image paths (all must be cached)."""
        rows = [self._feats[p] for p in paths]
        return [torch.stack([r[j] for r in rows]).float() for j in range(len(rows[0]))]
