"""Run configs: YAML round trip, ``--set`` overrides, errors that name the key, ``base:`` inheritance, presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlweave.config import ConfigError, RunConfig, StageConfig, TrainConfig
from vlweave.presets import list_presets, preset_path


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig()
    cfg.vision.select_layer = [-2, -1]
    cfg.connector.options = {"pool": 2, "input_norm": True}
    cfg.language.system_prompt = ""
    cfg.train.stages[1].connector_lr = 2e-4
    cfg.train.stages.append(StageConfig(name="extra", max_steps=3, template="plain"))
    cfg.eval.prompt_suffix = "\nAnswer briefly."
    cfg.save(tmp_path / "c.yaml")
    back = RunConfig.load(tmp_path / "c.yaml")
    assert back == cfg
    assert isinstance(back.train.stages[2], StageConfig) and back.train.stages[2].max_steps == 3
    assert back.language.system_prompt == "" and back.eval.prompt_suffix == "\nAnswer briefly."
    # Saving the reloaded config gives the same file.
    back.save(tmp_path / "d.yaml")
    assert (tmp_path / "d.yaml").read_text() == (tmp_path / "c.yaml").read_text()


def test_defaults():
    cfg = RunConfig.from_dict({})
    assert [s.name for s in cfg.train.stages] == ["align", "finetune"]
    assert cfg.train.stages[0].lr == 1e-3 and cfg.train.stages[0].tune["language"] == "frozen"
    assert cfg.train.stages[1].tune == {"vision": "frozen", "connector": "full", "language": "lora"}


def test_overrides(tmp_path):
    path = write(tmp_path / "c.yaml", {"vision": {"name": "dinov2-small"}})
    cfg = RunConfig.load(path, [
        "train.stages.1.lr=1e-4",  # YAML reads "1e-4" as a string; it must become a float
        "train.stages.0.max_steps=7",
        "connector.options.pool=2",
        "vision.select_layer=[-2, -1]",
        "language.system_prompt=",
        "train.bf16=false",
        "data.max_samples=null",
        "eval.limit=50",
        "language.config_overrides.num_hidden_layers=2",
    ])
    assert cfg.train.stages[1].lr == 1e-4 and isinstance(cfg.train.stages[1].lr, float)
    assert cfg.train.stages[0].max_steps == 7
    # The other fields of the materialised default stages are the defaults.
    assert cfg.train.stages[0].lr == TrainConfig().stages[0].lr and cfg.train.stages[1].name == "finetune"
    assert cfg.connector.options == {"pool": 2}
    assert cfg.vision.select_layer == [-2, -1]
    assert cfg.language.system_prompt == ""
    assert cfg.train.bf16 is False and cfg.data.max_samples is None and cfg.eval.limit == 50
    assert cfg.language.config_overrides == {"num_hidden_layers": 2}
    assert cfg.vision.name == "dinov2-small"


def test_override_errors(tmp_path):
    path = write(tmp_path / "c.yaml", {})
    with pytest.raises(ConfigError, match="expected key=value"):
        RunConfig.load(path, ["train.lr"])
    with pytest.raises(ConfigError, match=r"'5' is not a valid index into a list of 2"):
        RunConfig.load(path, ["train.stages.5.lr=1"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) train\.stages\.1\.lrr"):
        RunConfig.load(path, ["train.stages.1.lrr=1"])


def test_unknown_key_error_names_the_key(tmp_path):
    path = write(tmp_path / "c.yaml", {"vision": {"nmae": "x"}})
    with pytest.raises(ConfigError) as err:
        RunConfig.load(path)
    msg = str(err.value)
    assert str(path) in msg and "vision.nmae" in msg and "'name'" in msg
    with pytest.raises(ConfigError, match=r"unknown key\(s\) trian"):
        RunConfig.from_dict({"trian": {}})


@pytest.mark.parametrize("data,key,what", [
    ({"train": {"seed": "abc"}}, "train.seed", "must be int"),
    ({"train": {"bf16": 3}}, "train.bf16", "must be bool"),
    ({"train": {"seed": True}}, "train.seed", "must be int"),
    ({"train": {"stages": {"name": "x"}}}, "train.stages", "must be a list"),
    ({"train": {"stages": [{"lr": "fast"}]}}, "train.stages.0.lr", "must be float"),
    ({"vision": {"select_layer": "last"}}, "vision.select_layer", "does not match"),
    ({"connector": {"options": [1, 2]}}, "connector.options", "must be a mapping"),
    ({"language": "smollm2"}, "language", "must be a mapping"),
])
def test_type_errors(data, key, what):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(data, source="x.yaml")
    msg = str(err.value)
    assert msg.startswith(f"x.yaml: `{key}` ") and what in msg


def test_numbers_are_coerced():
    cfg = RunConfig.from_dict({"train": {"stages": [{"lr": 1, "epochs": "2.5"}]}})
    assert cfg.train.stages[0].lr == 1.0 and isinstance(cfg.train.stages[0].lr, float)
    assert cfg.train.stages[0].epochs == 2.5


def test_base_inheritance(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "parent.yaml", {
        "vision": {"name": "dinov2-small", "image_size": 112},
        "connector": {"type": "mlp2x_gelu", "options": {"pool": 4, "input_norm": True}},
        "train": {"seed": 3, "output_dir": "runs/parent"},
    })
    child = write(tmp_path / "sub" / "child.yaml", {
        "base": "../parent.yaml",
        "vision": {"image_size": 224},
        "connector": {"options": {"pool": 2}},
        "train": {"output_dir": "runs/child"},
    })
    cfg = RunConfig.load(child, ["train.seed=5"])
    assert cfg.vision.name == "dinov2-small" and cfg.vision.image_size == 224  # deep-merged
    assert cfg.connector.type == "mlp2x_gelu"
    assert cfg.connector.options == {"pool": 2}  # options are replaced as a whole, not merged
    assert cfg.train.output_dir == "runs/child" and cfg.train.seed == 5
    # Chains and cycles.
    grandchild = write(tmp_path / "gc.yaml", {"base": "sub/child.yaml", "train": {"seed": 9}})
    cfg = RunConfig.load(grandchild)
    assert (cfg.vision.image_size, cfg.vision.name, cfg.train.seed) == (224, "dinov2-small", 9)
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="circular"):
        RunConfig.load(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        RunConfig.load(write(tmp_path / "m.yaml", {"base": "missing.yaml"}))


def test_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        RunConfig.load(write(tmp_path / "bad.yaml", "vision: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        RunConfig.load(write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_presets_load():
    assert {"demo", "llava15"} <= set(list_presets())
    demo = RunConfig.load(preset_path("demo"))
    assert demo.vision.name == "dinov2-small" and demo.language.name == "smollm2-135m-instruct"
    from vlweave.connectors.mlp import ProjectorConnector

    assert set(demo.connector.options) <= ProjectorConnector.allowed_options  # the preset's options are accepted
    assert demo.train.stages and all(set(s.tune.values()) <= {"frozen", "full", "lora"} for s in demo.train.stages)
    assert demo.eval.data  # the demo evaluates on a held-out file
    llava = RunConfig.load(preset_path("llava15"), ["train.stages.1.lr=1e-5"])
    assert llava.vision.name == "openai/clip-vit-large-patch14-336" and llava.language.template == "vicuna_v1"
    assert llava.train.stages[0].grad_accum == 8 and llava.train.stages[1].lr == 1e-5
    assert llava.train.stages[1].tune["language"] == "full"
    with pytest.raises(FileNotFoundError, match="no config file or preset named 'nope'; presets: .*demo"):
        preset_path("nope")


@pytest.mark.parametrize("kind,tokens,width", [("sti", 720, 1024), ("sci", 576, 3072), ("dci", 576, 3072)])
def test_dense_presets_build_their_connectors(kind, tokens, width):
    """``dense-*`` (CLIP-L/336 + Vicuna-7B, reference layers) and ``demo-dense-*`` (DINOv2-S, derived layers): the
    connector each preset names builds from the tower facts with the preset's options."""
    from vlweave.connectors import ConnectorSpec, build_connector

    cfg = RunConfig.load(preset_path(f"dense-{kind}"))
    assert cfg.vision.name == "openai/clip-vit-large-patch14-336" and cfg.language.name == "lmsys/vicuna-7b-v1.5"
    clip_l = ConnectorSpec(vision_hidden_size=1024, num_vision_layers=24, grid=24, num_prefix_tokens=1,
                           text_hidden_size=64, select_layer=cfg.vision.select_layer,
                           options=cfg.connector.options, vision_model_type="clip_vision_model")
    conn = build_connector(cfg.connector.type, clip_l)
    assert (conn.num_tokens(), conn.projector[0].in_features) == (tokens, width)
    demo = RunConfig.load(preset_path(f"demo-dense-{kind}"))
    assert demo.train.stages == RunConfig.load(preset_path("demo")).train.stages  # same recipe as the demo
    dinov2_s = ConnectorSpec(vision_hidden_size=384, num_vision_layers=12, grid=8, num_prefix_tokens=1,
                             text_hidden_size=64, select_layer=demo.vision.select_layer, options=demo.connector.options,
                             vision_model_type="dinov2")
    conn = build_connector(demo.connector.type, dinov2_s)
    assert conn.num_tokens() == {"sti": 6, "sci": 4, "dci": 4}[kind]


def test_explicit_values_leave_out_defaults_recursively():
    from vlweave.config import RunConfig, StageConfig, explicit_values

    assert explicit_values(RunConfig()) == {}
    cfg = RunConfig()
    cfg.train.stages = [StageConfig(name="align", lr=1e-3), StageConfig()]
    cfg.train.seed = 3
    assert explicit_values(cfg) == {"train": {"stages": [{"name": "align", "lr": 1e-3}, {}], "seed": 3}}
