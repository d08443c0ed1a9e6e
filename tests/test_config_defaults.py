"""One source of defaults: the typed config's defaults are the values params.yaml ships,
and params.yaml spells out every value a stage reads, so DVC's params tracking sees every
one of them and a reader of config.py sees the numbers the pipeline runs with."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, create_model

from semilens.config import Config, EndpointConfig, ServerConfig, SftLLMConfig, endpoint_uses, load_config, own_settings

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = yaml.safe_load((ROOT / "params.yaml").read_text())


def differences(shipped: BaseModel, default: BaseModel) -> list[str]:
    """``key: params.yaml X, default Y`` for every leaf where two configs differ."""

    def walk(a: Any, b: Any, key: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            out = []
            for k in sorted(set(a) | set(b)):
                out += walk(a.get(k, "<none>"), b.get(k, "<none>"), f"{key}.{k}" if key else k)
            return out
        return [] if a == b else [f"{key}: params.yaml {a!r}, default {b!r}"]

    return walk(shipped.model_dump(mode="json"), default.model_dump(mode="json"), "")


def missing(raw: Any, kind: type[BaseModel] = Config, key: str = "") -> list[str]:
    """Dotted keys of the typed tree that ``raw`` (a params tree) leaves to a code default.

    A step's endpoint block needs its name and its own settings (``own_settings``); the
    server keys come from ``endpoints``, whose ``default`` must list them all (a further
    named endpoint sets only what differs from it)."""
    if not isinstance(raw, dict):
        return [f"{key}: not a mapping"]
    uses = {f"{section}.{field}": default for section, field, default in endpoint_uses()}
    if key in uses:
        return [f"{key}.{k}" for k in ["endpoint", *own_settings(uses[key])] if k not in raw]
    out = []
    for name, info in kind.model_fields.items():
        dotted = f"{key}.{name}" if key else name
        if name not in raw:
            out.append(dotted)
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out += missing(raw[name], info.annotation, dotted)
        elif get_origin(info.annotation) is dict and get_args(info.annotation)[1] is ServerConfig:
            out += missing(raw[name].get("default"), ServerConfig, f"{dotted}.default")
    return out


def test_params_yaml_spells_out_every_field():
    gaps = missing(SHIPPED)
    assert not gaps, "params.yaml leaves these to config.py's defaults (add them):\n" + "\n".join(gaps)


def test_the_typed_defaults_are_the_shipped_values():
    drift = differences(load_config(ROOT / "params.yaml"), Config())
    assert not drift, "config.py's defaults differ from params.yaml (make them equal):\n" + "\n".join(drift)


# ---------------------------------------------------------------- the checks can fail


def test_a_default_that_drifts_from_params_yaml_is_named():
    # config.py with one default changed, as it was before defaults had one source
    drifted = create_model("Drifted", __base__=Config, sft_llm=(SftLLMConfig, SftLLMConfig(max_steps=300)))
    drift = differences(drifted.model_validate(SHIPPED), drifted())
    assert drift == ["sft_llm.max_steps: params.yaml 100, default 300"]


def test_a_value_params_yaml_leaves_out_is_named():
    raw = copy.deepcopy(SHIPPED)
    del raw["finetune_vlm"]["trainer"]["learning_rate"]
    del raw["endpoints"]["default"]["timeout_s"]
    del raw["evaluate_llm"]["judge"]["api_key_env"]  # the judge's own key variable
    del raw["clean_markdown"]["llm"]["max_tokens"]
    assert missing(raw) == [
        "endpoints.default.timeout_s",
        "finetune_vlm.trainer.learning_rate",
        "clean_markdown.llm.max_tokens",
        "evaluate_llm.judge.api_key_env",
    ]


def test_endpoint_blocks_hold_the_step_s_own_settings_only():
    # every other key of a step's endpoint is declared once, under endpoints
    for section, field, default in endpoint_uses():
        assert isinstance(default, EndpointConfig)
        assert set(SHIPPED[section][field]) == {"endpoint", *own_settings(default)}, f"{section}.{field}"


def test_every_stage_that_reads_a_step_s_endpoint_tracks_endpoints():
    # the step's block only names a server, so DVC must watch `endpoints` too, or editing
    # the server would not re-run the stage
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    uses = {f"{section}.{field}" for section, field, _ in endpoint_uses()}

    def reads_endpoint(key: str) -> bool:  # the whole section, the endpoint block, or a key inside it
        return any(use.startswith(f"{key}.") or key == use or key.startswith(f"{use}.") for use in uses)

    untracked = []
    for name, stage in stages.items():
        keys = {p for p in stage.get("params", []) if isinstance(p, str)}
        if any(reads_endpoint(k) for k in keys) and "endpoints" not in keys:
            untracked.append(name)
    assert not untracked, f"dvc.yaml: add `endpoints` to the params of {untracked}"
