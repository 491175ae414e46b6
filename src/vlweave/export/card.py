"""Model cards: the ``README.md`` every saved checkpoint folder carries (Hugging Face hub format: YAML front
matter, then text).

It states what a reader needs to trust and reuse the weights: the tower(s), connector (with its options), LM,
training data and steps, and evaluation results found beside the checkpoint.  Facts come from the model config and,
when the folder is a run's ``final/`` (or inside a run), from the run's ``config.yaml``, its last training
checkpoint's ``progress.json`` and the evaluation files written by ``vlweave demo|eval`` -- never typed by hand.
:func:`write_model_card` is called by ``builder.save_checkpoint`` and again by ``vlweave export`` and
``vlweave eval`` (which add results that did not exist at save time).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

CARD = "README.md"


def _run_dir(folder: Path) -> Path | None:
    for candidate in (folder.parent, folder.parent.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    return None


def _training(run: Path | None) -> dict[str, Any]:
    if run is None:
        return {}
    info: dict[str, Any] = {}
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    data = cfg.get("data") or {}
    stages = (cfg.get("train") or {}).get("stages") or []
    info["data"] = {k: v for k, v in data.items() if k in ("train", "image_folder") and v}
    info["stages"] = [{k: s.get(k) for k in ("name", "tune", "lr", "max_steps", "batch_size", "data") if s.get(k)}
                      for s in stages]
    progress = sorted((run / "checkpoints").glob("ckpt-s*-*/progress.json"))
    if progress:
        try:
            metrics = json.loads(progress[-1].read_text()).get("metrics") or []
            info["steps"] = len(metrics)
            if metrics:
                info["final_loss"] = metrics[-1].get("loss")
        except (OSError, json.JSONDecodeError):
            pass
    return info


def _evals(folder: Path, run: Path | None) -> list[tuple[str, dict[str, float]]]:
    found: list[tuple[str, dict[str, float]]] = []
    roots = [folder] + ([run] if run is not None else [])
    seen: set[Path] = set()
    for root in roots:
        for name in ("metrics.json", "eval_metrics.json", "suite_metrics.json"):
            for path in sorted(root.glob(f"**/{name}")):
                if path in seen or "checkpoints" in path.relative_to(root).parts:
                    continue
                seen.add(path)
                try:
                    report = json.loads(path.read_text())
                except (OSError, json.JSONDecodeError):
                    continue
                scores = {k: float(v) for k, v in report.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)
                          and any(w in k for w in ("accuracy", "score", "f1", "precision", "recall"))}
                if scores:
                    found.append((str(path.relative_to(root.parent)), scores))
    return found


def model_card(config, folder: str | Path, *, title: str | None = None, extra: str = "",
               source: str | Path | None = None) -> str:
    """The card text for a vlweave (or exported) checkpoint described by a ``VlweaveConfig``; training and
    evaluation facts are looked up beside ``source`` (the checkpoint exported from; default ``folder``)."""
    folder = Path(source) if source is not None else Path(folder)
    run = _run_dir(folder)
    train = _training(run)
    towers = config.tower_specs()
    lm = config.text_config
    lm_name = getattr(lm, "_name_or_path", "") or getattr(lm, "model_type", "?")
    lines = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text",
             "tags: [vlweave, llava, multimodal]", "---", "", f"# {title or folder.name}", "",
             "A LLaVA-style vision-language model built and trained with "
             "vlweave (vision tower(s) -> connector -> causal LM).", "", "## Model", ""]
    for name, spec in towers.items():
        f = spec.facts
        lines.append(f"- vision tower `{name}`: `{spec.model_type}` ({f.num_layers} blocks, hidden {f.hidden_size}, "
                     f"{f.image_size} px, patch {f.patch_size}), features from layer(s) {spec.select_layer}, "
                     f"strategy `{spec.select_strategy}`")
    opts = json.dumps(config.connector_options or {}, sort_keys=True)
    lines.append(f"- connector: `{config.connector_type}` (options {opts})")
    lines.append(f"- language model: `{lm_name}` ({getattr(lm, 'model_type', '?')}, {lm.num_hidden_layers} layers, "
                 f"hidden {lm.hidden_size})")
    if config.lm_modules:
        lines.append(f"- LM-side modules: {', '.join(m['type'] + ' ' + repr(m['name']) for m in config.lm_modules)}")
    lines.append(f"- chat template: `{config.chat_template_name}`, system prompt: {config.system_prompt!r}")
    lines += ["", "## Training", ""]
    if train:
        if train.get("data"):
            lines.append(f"- data: {json.dumps(train['data'])}")
        for s in train.get("stages", []):
            lines.append(f"- stage {json.dumps(s)}")
        if "steps" in train:
            loss = train.get("final_loss")
            lines.append(f"- steps: {train['steps']}" + (f" (final loss {loss:.4f})" if loss is not None else ""))
    else:
        lines.append("- no run folder beside this checkpoint: training data and steps unknown")
    lines += ["", "## Evaluation", ""]
    evals = _evals(folder, run)
    if evals:
        for where, scores in evals:
            lines.append(f"- `{where}`: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    else:
        lines.append("- no evaluation results found beside this checkpoint")
    if extra:
        lines += ["", extra.rstrip()]
    return "\n".join(lines) + "\n"


NATIVE_USAGE = """## Use

```python
import vlweave  # registers model_type "vlweave" with transformers' Auto classes
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained(FOLDER)
processor = AutoProcessor.from_pretrained(FOLDER)
batch = processor(text=["What is in the image?"], images=[image])
answer = processor.tokenizer.decode(model.generate(**batch, max_new_tokens=32)[0], skip_special_tokens=True)
```

or `vlweave chat FOLDER --image IMAGE`, `vlweave serve FOLDER` (OpenAI-compatible HTTP)."""


def write_model_card(config, folder: str | Path, *, title: str | None = None, extra: str | None = None,
                     source: str | Path | None = None) -> Path:
    folder = Path(folder)
    text = model_card(config, folder, title=title or folder.name, extra=NATIVE_USAGE if extra is None else extra,
                      source=source)
    path = folder / CARD
    path.write_text(text)
    return path


def refresh_model_card(folder: str | Path) -> Path | None:
    """Rewrite a native checkpoint's card from its ``config.json`` (after evaluation results appeared beside it);
    None for a folder that is not a vlweave checkpoint."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file() or json.loads(cfg_file.read_text()).get("model_type") != "vlweave":
        return None
    from vlweave.modeling import VlweaveConfig

    return write_model_card(VlweaveConfig.from_pretrained(folder), folder)


__all__ = ["CARD", "model_card", "refresh_model_card", "write_model_card"]
