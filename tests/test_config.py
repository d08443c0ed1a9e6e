"""The typed config: the shipped params.yaml loads, unknown keys and bad values fail."""

from pathlib import Path

import pytest
import yaml

from semilens.config import Config, ConfigError, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_load_and_cover_every_section():
    cfg = load_config(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    # Every section of the typed config is spelled out in params.yaml, so users see it.
    assert set(raw) == set(Config.model_fields)
    assert cfg.synth_images.n_per_class >= 1


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_key_is_an_error(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["synth_images"]["n_per_clas"] = 3
    with pytest.raises(ConfigError, match=r"synth_images\.n_per_clas"):
        load_config(_write(tmp_path, raw))


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="typo_section"):
        load_config(_write(tmp_path, {"typo_section": {}}))


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("split_dataset", "val_fraction", 0.6),  # val + test >= 1
        ("synth_images", "pixel_size_nm", [5.0, 1.0]),
        ("synth_images", "classes", ["particles", "unicorns"]),
        ("annotate_images", "min_questions", 2),
    ],
)
def test_bad_values_name_the_key(tmp_path, section, key, value):
    raw = {section: {key: value}}
    if section == "split_dataset":
        raw[section]["test_fraction"] = 0.5
    with pytest.raises(ConfigError, match=section):
        load_config(_write(tmp_path, raw))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_dump_roundtrips():
    cfg = load_config(ROOT / "params.yaml")
    again = Config.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    # `semilens config endpoints` prints the named servers
    servers = yaml.safe_load(dump_config(cfg.endpoints))
    assert servers == {name: server.model_dump(mode="json") for name, server in cfg.endpoints.items()}


def test_tiny_overrides_change_one_family_only(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["prepare_vlm"]["tiny_overrides"] = {"qwen2_5_vl": {"max_pixels": 336 * 336}}
    pcfg = load_config(_write(tmp_path, raw)).prepare_vlm
    assert pcfg.tiny_for("qwen2_5_vl").max_pixels == 336 * 336
    for family in ("mllama", "paligemma"):
        assert pcfg.tiny_for(family) == pcfg.tiny
    assert pcfg.tiny_for("qwen2_5_vl").model_copy(update={"max_pixels": pcfg.tiny.max_pixels}) == pcfg.tiny


@pytest.mark.parametrize(
    "overrides,reason",
    [
        ({"qwen2_vl": {"max_pixels": 1}}, "'qwen2_vl', which is not a family"),
        ({"qwen2_5_vl": {"max_pixel": 1}}, r"unknown keys \['max_pixel'\]"),
        ({"qwen2_5_vl": {"heads": 3}}, "tiny_overrides.qwen2_5_vl: .*divide"),
    ],
)
def test_bad_tiny_overrides_say_why(tmp_path, overrides, reason):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["prepare_vlm"]["tiny_overrides"] = overrides
    with pytest.raises(ConfigError, match=f"prepare_vlm: .*{reason}"):
        load_config(_write(tmp_path, raw))


def test_steps_name_an_endpoint_declared_once(tmp_path):
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    # a new server sets what differs from `default`; a step names it; the others keep `default`
    apply_overrides(
        params,
        [
            "+endpoints.vllm.base_url=http://127.0.0.1:8000/v1",
            "+endpoints.vllm.model=qwen",
            "endpoints.default.concurrency=3",
            "annotate_images.vlm.endpoint=vllm",
        ],
    )
    cfg = load_config(params)
    vlm, llm, judge = cfg.annotate_images.vlm, cfg.clean_markdown.llm, cfg.evaluate_llm.judge
    assert (vlm.base_url, vlm.model, vlm.concurrency, vlm.max_tokens) == ("http://127.0.0.1:8000/v1", "qwen", 3, 768)
    assert (llm.base_url, llm.concurrency, llm.max_tokens) == (None, 3, 2048)
    # the judge's own key variable holds whichever endpoint it names
    assert (judge.concurrency, judge.api_key_env, judge.max_tokens) == (3, "SEMILENS_JUDGE_API_KEY", 512)


def test_an_unknown_endpoint_name_is_refused_naming_the_key(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["clean_markdown"]["llm"]["endpoint"] = "vllm"
    refused = r"clean_markdown\.llm\.endpoint: 'vllm' is not declared under endpoints \(default\)"
    with pytest.raises(ConfigError, match=refused):
        load_config(_write(tmp_path, raw))
    raw["clean_markdown"]["llm"]["endpoint"] = "default"
    raw["endpoints"]["default"]["concurency"] = 3
    with pytest.raises(ConfigError, match=r"^\S+: endpoints\.default\.concurency: Extra inputs are not permitted$"):
        load_config(_write(tmp_path, raw))  # reported once, not again at every step that names it
