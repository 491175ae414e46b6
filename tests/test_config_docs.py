"""docs/config.md is generated from the config dataclasses and their field comments: every field must have a
comment and the committed file must equal a fresh render; ``base:`` takes preset names; unknown keys suggest the
closest key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vlweave import config_docs
from vlweave.config import ConfigError, RunConfig

REPO = Path(__file__).resolve().parents[1]


def test_every_config_field_has_a_comment():
    assert config_docs.undocumented() == [], "add a comment to these fields in src/vlweave/config.py"


def test_docs_config_md_is_up_to_date():
    assert config_docs.check(REPO / "docs" / "config.md") == [], "run `vlweave config docs` and commit docs/config.md"


def test_reference_lists_every_key_with_type_default_and_comment():
    text = config_docs.render()
    keys = {f.key for _, _, rows in config_docs.field_docs() for f in rows}
    for cls, prefix in ((RunConfig, ""),):
        for f in dataclasses.fields(cls):
            assert f"{prefix}{f.name}" in keys
    assert {"train.stages[].lr", "train.lora.top_layers", "eval.max_new_tokens", "language.modules[].type",
            "vision.select_layer"} <= keys
    assert "| `train.stages[].lr` | `float` | `2.0e-05` | AdamW peak learning rate" in text
    assert "| `eval.limit` | `int \\| None` | `null` |" in text  # pipes in types are escaped for the table
    assert "## `towers.<name>`\n\nThe same keys as `vision` (above)." in text


def test_undocumented_field_and_stale_file_are_caught(tmp_path, monkeypatch):
    stale = tmp_path / "config.md"
    stale.write_text(config_docs.render().replace("AdamW peak learning rate", "old text"))
    assert any("stale" in p for p in config_docs.check(stale))
    assert any("missing" in p for p in config_docs.check(tmp_path / "none.md"))
    real = config_docs._class_fields

    def without_comment():
        parsed = real()
        parsed["EvalConfig"]["batch_size"] = (parsed["EvalConfig"]["batch_size"][0], "")
        return parsed

    monkeypatch.setattr(config_docs, "_class_fields", without_comment)
    assert config_docs.undocumented() == ["eval.batch_size"]
    with pytest.raises(ValueError, match="config fields without a comment.*eval.batch_size"):
        config_docs.write(tmp_path / "x.md")


def test_base_preset_name_and_closest_key(tmp_path):
    own = tmp_path / "own.yaml"
    own.write_text("base: demo\ndata: {train: mine.json}\n")
    cfg = RunConfig.load(own)
    demo = RunConfig.load(REPO / "configs" / "demo.yaml")
    assert cfg.data.train == "mine.json" and cfg.train.stages == demo.train.stages and cfg.connector == demo.connector
    own.write_text("base: dmeo\n")
    with pytest.raises(ConfigError, match=r"`base: dmeo` is neither a file next to it nor a preset .*did you mean "
                                          r"'demo'\?"):
        RunConfig.load(own)
    own.write_text("base: demo\ntrain: {stages: [{name: finetune, max_step: 10}]}\n")
    with pytest.raises(ConfigError, match=r"`train.stages.0.max_step`: did you mean `train.stages.0.max_steps`\?"):
        RunConfig.load(own)
    # a file named by base: still wins over a preset of the same name
    (tmp_path / "demo").write_text("eval: {limit: 3}\n")
    own.write_text("base: demo\n")
    assert RunConfig.load(own).eval.limit == 3
