"""Real-checkpoint presets: what a GPU user changes in ``params.yaml``, one file per checkpoint.

A preset (``presets/<name>.yaml``) names its VLM family, points that family's base at a
local checkpoint folder and sets the fine-tuning recipe (bf16 LoRA or QLoRA, unsloth where
it supports the family). It is checked against the typed config like ``params.yaml``
itself, and it is used either by copying its ``params`` into ``params.yaml`` or, without
touching the file, as a DVC experiment: ``command(preset)`` is ``dvc exp run`` with one
``-S key=value`` per setting and the family's stages as the target. The recipe keys are
shared by the families, so a preset run targets its own family alone.
"""

from __future__ import annotations

import copy
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from semilens.config import Config, ConfigError, validate_config

PRESETS_DIR = Path("presets")


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    summary: str
    params: dict[str, Any]  # a partial params tree


def load_preset(path: Path) -> Preset:
    """Read one preset file; a missing key or a family it does not set is refused."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not isinstance(raw, dict) or not {"family", "summary", "params"} <= set(raw):
        raise ConfigError(f"{path}: a preset needs family, summary and params")
    family = raw["family"]
    base = (raw["params"].get("prepare_vlm") or {}).get("bases") or {}
    if set(base) != {family}:
        raise ConfigError(f"{path}: must set prepare_vlm.bases.{family} and no other family's base")
    return Preset(path.stem, family, raw["summary"], raw["params"])


def available(folder: Path = PRESETS_DIR) -> dict[str, Preset]:
    return {p.stem: load_preset(p) for p in sorted(folder.glob("*.yaml"))}


def merge(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with ``overrides`` laid over it, mappings merged key by key."""
    out = copy.deepcopy(tree)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply(params: dict[str, Any], preset: Preset) -> Config:
    """The typed config of ``params`` with the preset laid over it (ConfigError if invalid)."""
    return validate_config(merge(params, preset.params), f"preset {preset.name}")


def settings(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Dotted keys and leaf values; a list or an empty mapping is one value."""
    out: list[tuple[str, Any]] = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += settings(value, dotted + ".")
        else:
            out.append((dotted, value))
    return out


def _flow(value: Any) -> str:
    # one line of YAML: null, false, 0.0001, [], [lm_head], a path (a bare scalar's dump
    # ends with the document-end marker "...")
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def set_args(preset: Preset) -> list[str]:
    """``key=value`` for ``dvc exp run -S`` (DVC reads the values as Hydra overrides)."""
    return [f"{key}={_flow(value)}" for key, value in settings(preset.params)]


def command(preset: Preset) -> str:
    """The ``dvc exp run`` that fine-tunes, evaluates and registers the preset's family."""
    args = ["dvc", "exp", "run", "-n", preset.name]
    for arg in set_args(preset):
        args += ["-S", arg]
    args.append(f"register_models@{preset.family}")
    return shlex.join(args)
