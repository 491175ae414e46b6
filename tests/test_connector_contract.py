"""The connector contract, checked for every registered connector (exact names and patterns; aliases excluded).

Each registry entry is built in the setups it declares (``ContractExample``s, given with
``@register(..., examples=(...))`` or as ``contract_examples`` on the connector class; a pattern must give one with
a concrete ``name``), else in a default one (its own name, no options, a tiny CLIP base tower), as a tiny
``VlweaveForConditionalGeneration`` (``tests/helpers.py`` ``make_run`` + ``vlweave.builder.build_model``).  Checks:

- it builds from facts (the model's ``ConnectorSpec``), twice alike, naming only towers and layers that exist;
- ``num_tokens()`` equals the tokens ``get_image_features`` produces (and the processor-expanded batch fits);
- cached (``FeatureCache``: ``prepare_tower`` per tower, then ``forward``) equals uncached (from pixels), and
  ``prepare_tower`` does not depend on the connector's parameters (they would be frozen into the cache);
- ``save_pretrained`` -> ``from_pretrained`` gives identical logits, with no connector key missing or unexpected;
- one training step with only the connector trainable changes exactly its parameters (towers, LM, buffers untouched);
- an unknown option and a mistyped value of every typed option (``options_class``) fail with an error naming them.

A new connector is picked up from the registry; when it lacks what a check needs, the failure says what to add.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from helpers import VISION, isolated_env, make_batch, make_run
from vlweave.builder import build_model
from vlweave.config import VisionConfig
from vlweave.connectors import ContractExample, build_connector, registry_entries
from vlweave.connectors.base import Connector, RegistryEntry
from vlweave.connectors.options import option_types, value_matches
from vlweave.data.llava_json import load_llava_data
from vlweave.modeling import VlweaveForConditionalGeneration
from vlweave.processing import tower_pixels
from vlweave.vision.cache import FeatureCache

ENTRIES = {e.key: e for e in registry_entries()}
HOWTO = ("declare how to build it: `@register(..., examples=(ContractExample(name=..., options={...}, "
         "vision='clip'|'siglip'|'dinov2', vision_overrides={...}, towers={'name': kind}),))` or a "
         "`contract_examples = (...)` class attribute (vlweave.connectors.base.ContractExample)")
# Values tried, in order, as a mistyped value for a typed option: the first its annotation refuses is used.
MISTYPED = ("2", 1.5, "yes", [1.5], {"x": 1})


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("contract")


@dataclasses.dataclass
class Built:
    name: str
    example: ContractExample
    label: str
    model: VlweaveForConditionalGeneration
    tokenizer: Any
    cfg: Any

    @property
    def connector(self) -> Connector:
        return self.model.connector


_BUILT: dict[tuple[str, int], list[Built]] = {}


def _tower(kind: str, label: str) -> dict:
    if kind not in VISION:
        pytest.fail(f"{label}: unknown tower kind {kind!r} in its ContractExample; known: {sorted(VISION)}")
    return copy.deepcopy(VISION[kind])


def _build_one(entry: RegistryEntry, example: ContractExample, index: int, workdir: Path) -> Built:
    name = example.name or (None if entry.is_pattern else entry.key)
    label = f"connector {entry.key!r} (example {index}: {name})"
    if name is None:
        pytest.fail(f"{label}: a pattern has no single name; give its ContractExample a concrete `name`")
    base = _tower(example.vision, label)
    cfg = make_run(workdir, vision=example.vision, connector=name, options=dict(example.options),
                   out=f"run-{name}-{index}")
    cfg.vision.config_overrides = {**base["config_overrides"], **example.vision_overrides}
    cfg.vision.select_layer = example.select_layer
    cfg.vision.select_strategy = example.select_strategy
    cfg.towers = {}
    for tname, kind in example.towers.items():
        t = _tower(kind, label)
        cfg.towers[tname] = VisionConfig(name=t["name"], image_size=t["image_size"], random_init=True,
                                         config_overrides=t["config_overrides"], select_layer=-2)
    try:
        model, tok = build_model(cfg)
    except Exception as err:  # noqa: BLE001  (any failure here is the author's to fix; say what to add)
        pytest.fail(f"{label}: could not build a tiny model with it ({type(err).__name__}: {err}). If it needs "
                    f"options, other towers or a concrete name, {HOWTO}.")
    model.eval()
    return Built(name, example, label, model, tok, cfg)


def built(entry: RegistryEntry, workdir: Path) -> list[Built]:
    """Every declared setup of ``entry``, built once per module (tests that change a model work on a copy)."""
    key = (entry.key, id(workdir))
    if key not in _BUILT:
        examples = entry.examples
        if not examples and entry.is_pattern:
            pytest.fail(f"connector pattern {entry.key!r} declares no ContractExample, so the suite cannot pick a "
                        f"name to build; {HOWTO}.")
        if not examples:
            default = _build_one(entry, ContractExample(), 0, workdir)
            examples = tuple(type(default.connector).contract_examples or ())
            if not examples:
                _BUILT[key] = [default]
                return _BUILT[key]
        _BUILT[key] = [_build_one(entry, ex, i, workdir) for i, ex in enumerate(examples)]
    return _BUILT[key]


def image_paths(b: Built, n: int) -> list[str]:
    return sorted(s.image for s in load_llava_data(b.cfg.data.train)[:n])


def batch_for(b: Built, model, n: int = 3) -> dict[str, Any]:
    """A right-padded training batch whose ``<image>`` slots were expanded with ``model.num_image_tokens``, with
    each needed tower's pixels."""
    batch = make_batch(model, b.tokenizer, b.cfg, n=n)
    samples = load_llava_data(b.cfg.data.train)[:n]
    batch["pixel_values"] = tower_pixels(model, [s.image for s in samples])
    return batch


params = pytest.mark.parametrize("key", sorted(ENTRIES))


# ---- builds from facts -----------------------------------------------------------------------------------------


@params
def test_builds_from_facts(key, workdir):
    for b in built(ENTRIES[key], workdir):
        conn, spec = b.connector, b.model.connector_spec()
        assert isinstance(conn, Connector), f"{b.label}: the factory must return a vlweave Connector"
        again = build_connector(b.name, spec)
        assert type(again) is type(conn)
        layers = conn.tower_layers()
        assert layers and layers == again.tower_layers(), \
            f"{b.label}: tower_layers() must be a pure function of the facts"
        for tower, idx in layers.items():
            assert tower in b.model.tower_specs, \
                f"{b.label}: needs tower {tower!r}; the model has {list(b.model.tower_specs)}"
            n = b.model.tower_facts[tower].num_layers
            assert idx and all(isinstance(i, int) and 0 <= i <= n for i in idx), \
                f"{b.label}: tower {tower!r} layers {idx} must be absolute hidden-state indices in [0, {n}]"
            sig = json.dumps(conn.prepare_signature(tower), sort_keys=True, default=str)
            assert sig == json.dumps(again.prepare_signature(tower), sort_keys=True, default=str)
        shapes = {k: tuple(v.shape) for k, v in conn.state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in again.state_dict().items()}
        n_tokens = conn.num_tokens()
        assert isinstance(n_tokens, int) and n_tokens > 0
        assert n_tokens == conn.num_tokens(spec.grid) == again.num_tokens() == b.model.num_image_tokens


# ---- token count ---------------------------------------------------------------------------------------------------


@params
def test_num_tokens_equals_tokens_produced(key, workdir):
    for b in built(ENTRIES[key], workdir):
        model = b.model
        pixels = tower_pixels(model, image_paths(b, 3))
        with torch.no_grad():
            tokens, aux = model.get_image_features(pixels)
        text_width = int(model.config.text_config.hidden_size)
        assert tuple(tokens.shape) == (3, b.connector.num_tokens(), text_width), \
            f"{b.label}: num_tokens() = {b.connector.num_tokens()} but forward produced {tuple(tokens.shape)}"
        assert isinstance(aux, dict) and all(torch.is_tensor(v) and v.dim() == 0 for v in aux.values())
        batch = batch_for(b, model)
        with torch.no_grad():
            out = model(**batch)  # the count check in embed_inputs raises on a mismatch
        assert torch.isfinite(out.loss)


# ---- cached == uncached ------------------------------------------------------------------------------------------


@params
def test_cached_equals_uncached(key, workdir):
    for b in built(ENTRIES[key], workdir):
        model = b.model
        paths = image_paths(b, 4)
        cache = FeatureCache(model, persist=False)
        cache.ensure(paths, progress=False)
        feats = cache.batch(paths)
        with torch.no_grad():
            cached, _ = model.get_image_features(vision_features=feats)
            uncached, _ = model.get_image_features(pixel_values=tower_pixels(model, paths))
        same = torch.equal(cached, uncached)
        assert same, (f"{b.label}: forward(prepare_tower(...)) from the cache differs from the same images from "
                      f"pixels (max {float((cached - uncached).abs().max())})")
        batch = batch_for(b, model)
        rows = load_llava_data(b.cfg.data.train)[:3]
        store_paths = sorted({s.image for s in rows})
        cache.ensure(store_paths, progress=False)
        with torch.no_grad():
            a = model(**batch).loss
            batch_cached = {k: v for k, v in batch.items() if k != "pixel_values"}
            b_loss = model(**batch_cached, vision_features=cache.batch([s.image for s in rows])).loss
        same = torch.equal(a, b_loss)
        assert same, f"{b.label}: the training loss differs with cached features ({float(a)} vs {float(b_loss)})"
        # prepare_tower is parameter-free: changing every connector parameter must not change what is cached.
        changed = copy.deepcopy(model)
        with torch.no_grad():
            for p in changed.connector.parameters():
                p.add_(1.0)
        pixels = tower_pixels(model, paths)
        for tower in model.needed_towers():
            with torch.no_grad():
                before = model.prepare_tower_features(tower, pixels[tower])
                after = changed.prepare_tower_features(tower, pixels[tower])
            same = len(before) == len(after) and all(torch.equal(x, y) for x, y in zip(before, after))
            assert same, (f"{b.label}: prepare_tower({tower!r}) depends on connector parameters; move that work to "
                          f"forward()")


# ---- save -> reload ----------------------------------------------------------------------------------------------


@params
def test_save_reload_identical_logits(key, workdir, tmp_path):
    for i, b in enumerate(built(ENTRIES[key], workdir)):
        model = copy.deepcopy(b.model)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():  # move the connector's saved state off its initial values, so a lost key shows
            for t in model.connector.state_dict(keep_vars=True).values():
                if t.is_floating_point():
                    t.add_(torch.rand(t.shape, generator=gen).to(t.dtype) * 0.1)
        batch = batch_for(b, model)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"]).logits
        folder = tmp_path / f"ckpt-{i}"
        model.save_pretrained(folder)
        saved = set(load_file(str(folder / "model.safetensors")))
        want = {f"connector.{k}" for k in model.connector.state_dict()}
        assert want <= saved, f"{b.label}: not saved: {sorted(want - saved)}"
        again, info = VlweaveForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
        again.eval()
        bad = [k for k in (*info["missing_keys"], *info["unexpected_keys"]) if "connector" in k]
        assert not bad, f"{b.label}: connector keys missing/unexpected on reload: {bad}"
        with torch.no_grad():
            reloaded = again(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=batch["pixel_values"]).logits
        same = torch.equal(logits, reloaded)
        assert same, f"{b.label}: logits differ after save -> reload (max {float((logits - reloaded).abs().max())})"
        assert again.num_image_tokens == model.num_image_tokens


# ---- one training step -------------------------------------------------------------------------------------------


@params
def test_one_training_step_changes_exactly_the_connector(key, workdir):
    for b in built(ENTRIES[key], workdir):
        model = copy.deepcopy(b.model)
        model.train()
        model.requires_grad_(False)
        model.connector.requires_grad_(True)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert all(n.startswith("connector.") for n in trainable)
        state = dict(model.named_parameters()) | dict(model.named_buffers())
        before = {n: t.detach().clone() for n, t in state.items()}
        batch = batch_for(b, model)
        loss = model(**batch).loss
        if trainable:
            loss.backward()
            torch.optim.Adam([state[n] for n in sorted(trainable)], lr=1e-2).step()
        else:
            assert not loss.requires_grad
        frozen_with_grad = [n for n, p in model.named_parameters() if n not in trainable and p.grad is not None]
        assert not frozen_with_grad, f"{b.label}: frozen parameters got gradients: {frozen_with_grad[:5]}"
        changed = {n for n, t in state.items() if not torch.equal(before[n], t.detach())}
        exact = changed == trainable
        assert exact, (
            f"{b.label}: one training step must change exactly the connector's parameters; unchanged trainable: "
            f"{sorted(trainable - changed)} (are they used in forward?), changed but not trainable: "
            f"{sorted(changed - trainable)}")


# ---- bad options ------------------------------------------------------------------------------------------------


def _mistyped(tp: Any) -> Any:
    return next((v for v in MISTYPED if not value_matches(v, tp)), None)


@params
def test_bad_options_give_clear_errors(key, workdir):
    for b in built(ENTRIES[key], workdir):
        spec = b.model.connector_spec()
        given = dict(b.example.options)
        cls = type(b.connector).options_class

        with pytest.raises(ValueError) as err:
            build_connector(b.name, dataclasses.replace(spec, options={**given, "no_such_option": 1}))
        msg = str(err.value)
        assert "no_such_option" in msg, f"{b.label}: the error for an unknown option must name it; got: {msg}"
        if cls is not None:
            missing = [f.name for f in dataclasses.fields(cls) if f.name not in msg]
            assert not missing, \
                f"{b.label}: the unknown-option error must list the allowed keys; lacks {missing}: {msg}"

        if cls is None and not b.example.bad_options:
            pytest.fail(f"{b.label}: no typed options, so the suite cannot check that a mistyped value is refused. "
                        f"Set `options_class = <a frozen dataclass of its options>` on the connector class "
                        f"(parse it with vlweave.connectors.options.parse_options), or give a ContractExample with "
                        f"`bad_options=({{'option': <mistyped value>}},)`.")
        tried = 0
        for name, tp in (option_types(cls).items() if cls is not None else []):
            bad = _mistyped(tp)
            if bad is None:
                continue
            tried += 1
            with pytest.raises(ValueError) as err:
                build_connector(b.name, dataclasses.replace(spec, options={**given, name: bad}))
            msg = str(err.value)
            assert name in msg, f"{b.label}: the error for {name}={bad!r} must name {name!r}: {msg}"
            assert repr(bad) in msg, f"{b.label}: the error for {name}={bad!r} must show the value: {msg}"
        for bad_options in b.example.bad_options:
            tried += 1
            with pytest.raises(ValueError):
                build_connector(b.name, dataclasses.replace(spec, options={**given, **bad_options}))
        assert tried or cls is not None, f"{b.label}: no bad option was tried"


def test_every_registered_connector_is_checked():
    """The suite iterates the live registry: every exact name and pattern is a parameter of the checks above."""
    names = {e.key for e in registry_entries()}
    assert {"identity", "linear", r"mlp(\d+)x_gelu", "dense_sti", "dense_sci", "dense_dci"} <= names
    assert names == set(ENTRIES)
