"""Named YAML presets shipped with the package (``configs/`` at the repository root points here)."""

from __future__ import annotations

from pathlib import Path

PRESET_DIR = Path(__file__).parent / "configs"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name_or_path: str) -> Path:
    """A preset name (``demo``) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = PRESET_DIR / f"{name_or_path}.yaml"
    if cand.exists():
        return cand
    raise FileNotFoundError(f"no config file or preset named {name_or_path!r}; presets: {', '.join(list_presets())}")
