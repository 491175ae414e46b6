"""Typed run configuration: dataclasses with YAML in/out and ``--set key=value`` overrides.

A run config describes *what to build* (vision, connector, language), *what to train on* (data), *how*
(train stages) and *how to evaluate* (eval).  It is deliberately separate from the HF ``VlweaveConfig``
(``modeling.py``), which describes only a built model and travels with its checkpoints; every run saves its
resolved run config beside its checkpoints so that a result can always be traced to the exact settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the key and the problem."""


@dataclass
class VisionConfig:
    """A (frozen) vision tower and which of its hidden states the connector sees: ``vision`` is the base tower;
    ``towers`` (name -> VisionConfig) adds others beside it (MoVA's experts), each with its own input size and
    normalisation."""

    name: str = "dinov2-small"  # asset name, hub id or local folder of an HF vision model
    image_size: int | None = None  # None: the tower's own size
    select_layer: int | list[int] = -2  # HF llava `vision_feature_layer` semantics (index into hidden_states)
    select_strategy: str = "default"  # "default": drop CLS/prefix tokens; "full": keep them
    aspect: str = "pad"  # image transform: "pad" (LLaVA-1.5 stage 2) or "square"
    image_mean: list[float] | None = None  # None: the tower folder's preprocessor_config.json, else its family's
    image_std: list[float] | None = None  # give both image_mean and image_std, or neither
    random_init: bool = False  # build from config only (tests, or towers whose weights are not available offline)
    config_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. tiny test towers


@dataclass
class ConnectorConfig:
    """Connector type (registry key) and its options; see ``vlweave.connectors``."""

    # identity | linear | mlpNx_gelu | dense_sti | dense_sci | dense_dci | tower_concat (docs/dense.md)
    type: str = "mlp2x_gelu"
    options: dict[str, Any] = field(default_factory=dict)  # typed per family (connectors/options.py), e.g. {pool: 4}


@dataclass
class LMModuleConfig:
    """An LM-side module a method adds inside or beside the LM (``vlweave.language.modules`` registry key); its tune
    key is ``name`` (default: the type)."""

    type: str = ""  # registry key in vlweave.language.modules, e.g. "block_adapter"
    name: str | None = None  # tune key and weight prefix (None: the type); two modules of one type need names
    options: dict[str, Any] = field(default_factory=dict)  # the module's own options, e.g. {layers: [-1]}


@dataclass
class LanguageConfig:
    """The causal LM, its chat template and sequence budget, and LM-side modules (``modules``)."""

    name: str = "smollm2-135m-instruct"  # asset name, hub id or local folder of an HF causal LM
    tokenizer: str | None = None  # None: the LM's own folder
    template: str = "tokenizer"  # "plain" | "vicuna_v1" | "tokenizer" (the tokenizer's own Jinja template)
    system_prompt: str | None = None  # None: the template's default; "": no system message at all
    max_length: int = 2048  # tokens per training sample (image tokens included); longer samples are cut
    random_init: bool = False  # build the LM from its config with random weights (tests)
    config_overrides: dict[str, Any] = field(default_factory=dict)  # set on the LM's config before building
    modules: list[LMModuleConfig] = field(default_factory=list)  # e.g. [{type: block_adapter, options: {layers: [-1]}}]
    # QLoRA: load the LM's linear weights in 4-bit NF4 (bitsandbytes, CUDA only; `pip install vlweave[qlora]`); the
    # LM may then only be trained through LoRA (builder.check_quantization).
    load_in_4bit: bool = False


@dataclass
class DataConfig:
    """Training data in LLaVA JSON/JSONL form."""

    train: str = ""  # path; may start with an asset name, e.g. "easy-vqa:train.json"
    image_folder: str | None = None  # default: the data file's folder
    align: str | None = None  # separate data for the `align` stage (None: use `train`)
    max_samples: int | None = None  # use only the first N records of each stage's file (None: all)
    # None: pad each batch to its longest sequence (every padded token is computed: on this fp32 CPU rounding the
    # demo's 21-27-token samples up to 32 made a step 1.17-1.25x slower). Set 8/16 where bf16 autocast runs on a
    # CPU with AMX: there each new sequence length pays a kernel warm-up (../shared/design.md section 7).
    pad_to_multiple_of: int | None = None


@dataclass
class LoraConfig:
    """PEFT LoRA for components whose stage policy is ``lora``."""

    r: int = 16  # LoRA rank
    alpha: int = 32  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # dropout on the LoRA input
    # Regex over module names: restrict LoRA to the LM (Dinov2 in transformers 5 uses the same q/k/v/o names).
    target_modules: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    # Only the LM's top N decoder layers (None: all). With the connector frozen, backward then stops below them:
    # a SmolLM2 finetune step with top_layers 15 of 30 measured ~28 % cheaper on the 2-core CPU.
    top_layers: int | None = None


@dataclass
class MixConfig:
    """Extra records mixed into a stage: ``round(ratio * N)`` of them, N being the stage's own record count (a
    seeded sample; repeated only when the source is smaller).  MoVA mixes its routing instructions into SFT."""

    path: str = ""  # LLaVA JSON/JSONL; may start with an asset name
    ratio: float = 0.1  # records mixed in per record of the stage's own data
    image_folder: str | None = None  # None: the file's folder


@dataclass
class StageConfig:
    """One training stage. ``tune`` maps component -> policy (``frozen | full | lora``)."""

    name: str = "finetune"  # "align" takes data.align when set; any other name takes data.train
    # component (tune key: vision | vision.<tower> | connector | language | an LM module's name) -> policy
    tune: dict[str, str] = field(default_factory=lambda: {"vision": "frozen", "connector": "full", "language": "lora"})
    template: str | None = None  # None: language.template (LLaVA's align stage uses "plain")
    data: str | None = None  # None: data.train (or data.align for the align stage)
    mix: list[MixConfig] = field(default_factory=list)  # e.g. [{path: routing.json, ratio: 0.1}]
    epochs: float = 1.0  # passes over the stage's data (fractions allowed)
    max_steps: int | None = None  # caps epochs when set
    batch_size: int = 16  # samples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-5  # AdamW peak learning rate (cosine schedule after warm-up)
    connector_lr: float | None = None  # separate lr for the connector (LLaVA LoRA recipe: mm_projector_lr)
    # Per-component lr overrides by tune key ({connector: 1e-3, block_adapter: 1e-3}; `vision` = every tower);
    # a component_lr entry wins over connector_lr, which wins over lr.
    component_lr: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.03  # share of the stage's steps with linear warm-up
    max_grad_norm: float = 1.0  # gradient clipping (0: none)
    # Align objective tying visual tokens to words: visual token j is pulled toward the LM's input embedding of the
    # answer's j-th token (cycling over the answer, its end-of-turn token left out), as a squared error relative to
    # the embeddings' size, times this weight, added to the LM loss.  Meant for caption stages ("red circle").
    word_tie: float = 0.0


@dataclass
class TrainConfig:
    """Stages, LoRA settings, seed, precision and the run folder."""

    # the stages in order; the default is LLaVA's two (align: connector only at 1e-3; finetune: connector + LM LoRA)
    stages: list[StageConfig] = field(
        default_factory=lambda: [
            StageConfig(name="align", tune={"vision": "frozen", "connector": "full", "language": "frozen"}, lr=1e-3),
            StageConfig(name="finetune"),
        ]
    )
    lora: LoraConfig = field(default_factory=LoraConfig)  # used by every stage with a `lora` policy
    seed: int = 0  # model init and data order (a resumed run replays the same batches)
    bf16: bool = True  # autocast where the hardware supports it
    cache_features: bool = True  # frozen-feature cache: a frozen tower runs once per image
    save_every: int = 0  # steps; 0 = only at stage ends
    # auto | no | bf16 | fp16: auto = `accelerate launch`'s mixed_precision when launched, else bf16 where native
    # (and `bf16` above allows it); fp16 (loss scaling) on CUDA only.  See train/distributed.py.
    mixed_precision: str = "auto"
    # The attention kernel while training (the LM, trained towers and text encoders, the MoV-Adapter's own
    # attention): auto (eager on CPU, where PyTorch's SDPA backward is slow: 0.74x step time in
    # bench/bench_attention.py; the model's own elsewhere), model, sdpa or eager.  Evaluation and generation
    # always use the model's own.
    attn_implementation: str = "model"
    # Components that recompute activations in backward: language, vision (every tower), vision.<name>.
    gradient_checkpointing: list[str] = field(default_factory=list)
    # DDP only: for connectors/modules whose parameters do not all get a gradient every step.
    find_unused_parameters: bool = False
    keep_checkpoints: int | None = None  # keep the newest N checkpoints (None: all); >= 2 leaves a fallback
    on_nonfinite: str = "stop"  # NaN/inf loss or gradient: "stop" (exit non-zero) or "skip" the batch (counted)
    log_every: int = 10  # kept for old configs: every step is logged to train_metrics.json
    output_dir: str = "runs/default"  # the run folder: config.yaml, checkpoints/, final/, metrics


@dataclass
class EvalConfig:
    """Held-out questions: `vlweave train` evaluates on them at the end, `vlweave eval` of the checkpoint by
    default, the demo and `compare` always."""

    # "synthetic": the embedded scenes/documents/charts benchmark (compare, demo variants)
    data: str = ""  # question JSONL ({question_id, image, text, answer}); may start with an asset name
    image_folder: str | None = None  # folder the questions' image paths are relative to (default: the file's)
    limit: int | None = None  # evaluate N questions: the first N, or a seeded sample of N (subset_seed)
    subset_seed: int | None = 0  # fixed across runs/seeds so every model answers the same questions
    batch_size: int = 32  # questions per generation batch
    max_new_tokens: int = 8  # greedy answer length cap
    prompt_suffix: str = ""  # e.g. "\nAnswer the question using a single word or phrase."
    # A routed (MoVA) model: "model" (the LM routes each question: the coarse stage), or fixed for ablations --
    # "all", "none", "random" (seeded by routing_seed) or letters/experts like "A,C"; None: no routing information
    # (the connector's own default, for MoVA every expert on).
    routing: str | None = None
    routing_seed: int = 0  # seed of routing "random" (per question id)


@dataclass
class RunConfig:
    """What to build (vision, towers, connector, language), what to train on (data), how (train), and how to
    evaluate (eval)."""

    vision: VisionConfig = field(default_factory=VisionConfig)  # the base vision tower
    towers: dict[str, VisionConfig] = field(default_factory=dict)  # extra towers by name ("base" is `vision`)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)  # vision features -> LM embeddings
    language: LanguageConfig = field(default_factory=LanguageConfig)  # the causal LM and its template
    data: DataConfig = field(default_factory=DataConfig)  # training files
    train: TrainConfig = field(default_factory=TrainConfig)  # stages and run folder
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out questions

    # ---- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "<dict>") -> "RunConfig":
        return _build(cls, data, source, prefix="")

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "RunConfig":
        """Load YAML (``base: other.yaml`` inherits, paths relative to the file), then apply overrides."""
        data = _load_yaml_with_base(Path(path))
        for item in overrides or []:
            _apply_override(data, item)
        return cls.from_dict(data, source=str(path))


# ---- helpers -------------------------------------------------------------------------------------------


def _load_yaml_with_base(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular `base:` chain")
    try:
        from vlweave.safe_io import read_text_file

        data = yaml.safe_load(read_text_file(path, error=ConfigError)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base:
        parent = _load_yaml_with_base(_base_path(path, str(base)), seen + (path.resolve(),))
        data = _deep_merge(parent, data)
    return data


def _base_path(path: Path, base: str) -> Path:
    """``base:`` is a YAML path relative to the file, or a preset name (``base: demo``) when no such file exists."""
    from vlweave.presets import PRESET_DIR, list_presets

    candidate = path.parent / base
    if candidate.exists() or Path(base).suffix in (".yaml", ".yml"):
        return candidate
    if (PRESET_DIR / f"{base}.yaml").exists():
        return PRESET_DIR / f"{base}.yaml"
    raise ConfigError(f"{path}: `base: {base}` is neither a file next to it nor a preset "
                      f"({', '.join(list_presets())}){_did_you_mean(base, list_presets())}")


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("options", "tune"):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(data: dict[str, Any], item: str) -> None:
    """``a.b.c=value``; the value is parsed as YAML (numbers, lists, null); ``train.stages.1.lr=1e-4`` indexes lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    parts = key.strip().split(".")
    for by_component in ("tune", "component_lr"):  # component names have dots: tune.vision.base is one key
        if by_component in parts[:-2]:
            i = parts.index(by_component)
            parts = parts[: i + 1] + [".".join(parts[i + 1 :])]
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, key)]
            continue
        if part not in node or node[part] is None:
            if part == "stages":  # materialise the default stages so that one of them can be overridden
                node[part] = [dataclasses.asdict(s) for s in TrainConfig().stages]
            else:
                node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, key: str) -> int:
    try:
        idx = int(part)
        node[idx]
        return idx
    except (ValueError, IndexError):
        raise ConfigError(f"override {key!r}: {part!r} is not a valid index into a list of {len(node)}") from None


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: `{prefix.rstrip('.') or '<root>'}` must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        suggest = ""
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(names), n=1, cutoff=0.6)
            suggest += f"; `{prefix}{k}`: did you mean `{prefix}{close[0]}`?" if close else ""
        raise ConfigError(f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)}{suggest}; "
                          f"known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, source, prefix + name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{source}: `{key}` = {value!r} does not match {tp}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: `{key}` must be a list, got {value!r}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_coerce(arg, v, source, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: `{key}` must be a mapping, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and dataclasses.is_dataclass(args[1]):
            return {str(k): _build(args[1], v, source, f"{key}.{k}.") for k, v in value.items()}
        if len(args) == 2 and args[1] in (int, float, str, bool):
            return {str(k): _coerce(args[1], v, source, f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "1e-3" as a string
        except ValueError:
            pass
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: `{key}` must be {getattr(tp, '__name__', tp)}, got {value!r}")


def dumps(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2)


def explicit_values(obj: Any) -> Any:
    """A config with every field that equals its dataclass default left out (recursively; list items are kept
    in place, each reduced the same way): what a run's behaviour depends on beyond the defaults.  A field added
    later with a default that keeps the old behaviour does not change it, so a fingerprint of it (``vlweave
    compare``'s finished-run key) survives new options."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            if default is not dataclasses.MISSING and value == default:
                continue
            out[f.name] = explicit_values(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [explicit_values(v) for v in obj]
    if isinstance(obj, dict):
        return {k: explicit_values(v) for k, v in obj.items()}
    return obj
