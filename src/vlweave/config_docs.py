"""``docs/config.md`` generated from the run-config dataclasses (``vlweave.config``) and their field comments.

Each field's documentation is its comment in ``config.py``: the comment at the end of the field's line(s), or the
comment lines right above it (both, joined, when there are both).  A field without one is an error
(:func:`undocumented`), and the committed ``docs/config.md`` must equal :func:`render` (``vlweave config docs
--check``; a test runs both), so the reference cannot go stale or miss a key.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import tokenize
import typing
from pathlib import Path
from typing import Any

import yaml

from vlweave import config as config_module
from vlweave.config import RunConfig

DOC_PATH = Path("docs") / "config.md"
EXAMPLE_PRESET = "demo"


@dataclasses.dataclass
class FieldDoc:
    key: str  # dotted path, e.g. "train.stages[].lr"
    type: str
    default: str
    comment: str


def _comments() -> dict[int, str]:
    """Line number -> comment text (without ``#``) of every comment in config.py."""
    source = Path(config_module.__file__).read_text()
    out: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _class_fields() -> dict[str, dict[str, tuple[str, str]]]:
    """Class name -> field name -> (annotation source, comment) from config.py's syntax tree."""
    source = Path(config_module.__file__).read_text()
    lines = source.splitlines()
    comments = _comments()
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields: dict[str, tuple[str, str]] = {}
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above: list[str] = []
            line = stmt.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            trailing = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in comments
                        and not lines[n - 1].strip().startswith("#")]
            text = " ".join(above + trailing).strip()
            fields[stmt.target.id] = (ast.unparse(stmt.annotation), text)
        out[node.name] = fields
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _show(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return "(section below)"
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        return f"{len(value)} entries (below)"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") or text.endswith(" ...") else text.removesuffix("...").strip()


def _nested(tp: Any) -> tuple[type | None, str]:
    """The dataclass a field holds (itself, as list items ``[]`` or as mapping values ``.<name>``), if any."""
    if dataclasses.is_dataclass(tp):
        return tp, ""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return args[0], "[]"
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return args[1], ".<name>"
    return None, ""


def field_docs() -> list[tuple[str, str, list[FieldDoc]]]:
    """(section key, class docstring, fields) for RunConfig and every dataclass under it, depth first."""
    parsed = _class_fields()
    sections: list[tuple[str, str, list[FieldDoc]]] = []
    first_at: dict[type, str] = {}  # a class met again (``towers.<name>`` holds VisionConfigs) points back here

    def walk(cls: type, prefix: str) -> None:
        if cls in first_at:
            sections.append((prefix.rstrip("."), f"The same keys as `{first_at[cls]}` (above).", []))
            return
        first_at[cls] = prefix.rstrip(".")
        hints = typing.get_type_hints(cls)
        rows, children = [], []
        for f in dataclasses.fields(cls):
            annotation, comment = parsed.get(cls.__name__, {}).get(f.name, ("", ""))
            key = f"{prefix}{f.name}"
            rows.append(FieldDoc(key, annotation, _show(_default(f)), comment))
            sub, suffix = _nested(hints[f.name])
            if sub is not None:
                children.append((sub, f"{key}{suffix}."))
        doc = " ".join((cls.__doc__ or "").split()) if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") \
            else ""
        sections.append((prefix.rstrip(".") or "(top level)", doc, rows))
        for sub, sub_prefix in children:
            walk(sub, sub_prefix)

    walk(RunConfig, "")
    return sections


def undocumented() -> list[str]:
    """Keys whose field has no comment in config.py."""
    return [f.key for _, _, rows in field_docs() for f in rows if not f.comment]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    """The Markdown reference: how configs load, an example, then one table per section."""
    from vlweave.presets import PRESET_DIR, list_presets

    example = (PRESET_DIR / f"{EXAMPLE_PRESET}.yaml").read_text().rstrip()
    out = [
        "# Run configuration reference",
        "",
        "<!-- Generated by `vlweave config docs` from the dataclasses in src/vlweave/config.py and their field",
        "     comments; do not edit by hand (tests/test_config_docs.py fails when this file is stale). -->",
        "",
        "A run config is one YAML file. Every key is optional: a missing key takes the default below. Load order:",
        "",
        "1. `base:` (optional, top level): a YAML file (relative to this one) or a preset name (`base: demo`; presets: "
        + ", ".join(f"`{p}`" for p in list_presets()) + "). The file's keys are merged over the base's, "
        "mapping by mapping; lists (`train.stages`) and the `options`/`tune` mappings are replaced whole.",
        "2. `--set KEY=VALUE` on the command line (any number): `train.stages.1.lr=1e-4` indexes lists, "
        "`train.stages.0.tune.vision.base=frozen` names a component; the value is read as YAML.",
        "3. Unknown keys and wrong types are errors naming the file and key (with the closest known key).",
        "",
        "Every run saves its resolved config as `config.yaml` in its run folder and `final/run_config.yaml`.",
        "",
        f"## Example: the `{EXAMPLE_PRESET}` preset",
        "",
        "```yaml",
        example,
        "```",
        "",
        "A config that trains on your own data can start from it (see docs/own-data.md):",
        "",
        "```yaml",
        "base: demo",
        "data: {train: data/mine/train.json, align: data/mine/captions.json}",
        "eval: {data: data/mine/test.jsonl}",
        "train: {output_dir: runs/mine}",
        "```",
    ]
    for section, doc, rows in field_docs():
        out += ["", f"## `{section}`" if section != "(top level)" else "## Top level", ""]
        if doc:
            out += [doc] + ([""] if rows else [])
        if not rows:
            continue
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{f.key}` | `{_cell(f.type)}` | `{_cell(f.default)}` | {_cell(f.comment)} |" for f in rows]
    return "\n".join(out) + "\n"


def write(path: str | Path = DOC_PATH) -> Path:
    missing = undocumented()
    if missing:
        raise ValueError(f"config fields without a comment in {config_module.__file__}: {', '.join(missing)}")
    Path(path).write_text(render())
    return Path(path)


def check(path: str | Path = DOC_PATH) -> list[str]:
    """Problems with the committed reference: undocumented fields, a stale or missing file."""
    problems = [f"no comment for config key `{k}` in src/vlweave/config.py" for k in undocumented()]
    p = Path(path)
    if not p.is_file():
        problems.append(f"{p}: missing; run `vlweave config docs`")
    elif p.read_text() != render():
        problems.append(f"{p}: stale (the config dataclasses changed); run `vlweave config docs`")
    return problems


__all__ = ["DOC_PATH", "FieldDoc", "check", "field_docs", "render", "undocumented", "write"]
