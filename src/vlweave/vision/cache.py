"""Frozen-feature cache: a frozen tower runs once per image, not once per epoch/stage/seed.

Stores the connector's *prepared* input of one named tower (its selected hidden states after the prefix strategy
and the connector's parameter-free ``prepare_tower``: pooling, Dense Connector fusion; before anything trainable)
per image path, in memory and optionally on disk (one safetensors file per key under ``cache_dir()/features``), so
repeated runs on the same images skip the tower entirely.

The key of a (tower, connector) pair is :func:`tower_cache_key`: the tower's config and facts, a fingerprint of its
weights, its transform, the layers the connector takes from it and the connector's prepare signature.
:class:`FeatureCache` is the one place that creates stores: one per tower the connector needs; towers it does not
need are never run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vlweave import assets
from vlweave.processing import load_image, tower_transform  # noqa: F401  (re-exported: older imports read it from here)
from vlweave.vision.towers import BASE_TOWER


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
    desc = {
        "tower": tower,
        "config": spec.config.to_dict(),
        "facts": spec.facts.to_dict(),
        "layers": model.connector.tower_layers()[tower],
        "prepare": model.connector.prepare_signature(tower),
        "strategy": spec.select_strategy,
        "transform": spec.transform_desc(),
        "weights": weights_fingerprint(model.vision_towers[tower]),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FeatureStore:
    """Image path -> the prepared feature tensors [N, C] of one frozen tower (create through :class:`FeatureCache`)."""

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
        self._feats: dict[str, list[torch.Tensor]] = {}
        self._dirty = False
        # Images asked for through ``ensure`` that were already there (memory or the on-disk cache) / that ran
        # the tower: the run's feature-cache hit rate (train_metrics.json).
        self.hits = 0
        self.misses = 0
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
        wanted = {p for p in paths if p is not None}
        missing = sorted(p for p in wanted if p not in self._feats)
        self.hits += len(wanted) - len(missing)
        self.misses += len(missing)
        if not missing:
            return
        self.model.eval()
        bar = tqdm(total=len(missing), desc=desc, disable=not progress, unit="img")
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            pixels = torch.stack([self.transform(load_image(p)) for p in chunk])
            feats = self.model.prepare_tower_features(self.tower, pixels)
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


class FeatureCache:
    """The frozen-feature stores of every tower a model's connector needs, keyed by tower name."""

    def __init__(self, model, *, persist: bool = True, dtype: torch.dtype = torch.float32) -> None:
        self.stores: dict[str, FeatureStore] = {
            name: FeatureStore(model, tower_transform(model.tower_specs[name]), tower=name, persist=persist,
                               dtype=dtype)
            for name in model.needed_towers()
        }

    @staticmethod
    def usable(model) -> bool:
        """Caching is exact only for frozen towers."""
        return not any(p.requires_grad for n in model.needed_towers() for p in model.vision_towers[n].parameters())

    def ensure(self, paths: Sequence[str], progress: bool = True) -> None:
        for name, store in self.stores.items():
            store.ensure(paths, progress, desc=f"caching tower features ({name})")

    def __contains__(self, path: str) -> bool:
        return all(path in store for store in self.stores.values())

    def hit_rate(self) -> dict[str, dict[str, float]]:
        """Per tower: images found cached / computed by ``ensure`` so far, and the hit rate."""
        return {name: {"hits": s.hits, "misses": s.misses,
                       "hit_rate": s.hits / (s.hits + s.misses) if s.hits + s.misses else 0.0}
                for name, s in self.stores.items()}

    def batch(self, paths: Sequence[str]) -> dict[str, list[torch.Tensor]]:
        """Per tower: stacked prepared features [B, N, C] for ``paths`` (all must be cached)."""
        return {name: store.batch(paths) for name, store in self.stores.items()}
