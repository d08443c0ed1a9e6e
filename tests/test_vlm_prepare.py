"""prepare_vlm on the tiny Qwen2.5-VL preset: build, generic pretraining, save, reload.

Everything is built locally from config (no hub); the checks are the ones a real
checkpoint must pass: the Auto classes load it, token ids agree, the chat template and
image tokens work, generation runs.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from semilens.checkpoints import SOURCE_FILE, resolve_checkpoint
from semilens.config import Config, PathsConfig, PrepareVLMConfig, TinyVLMConfig, VLMPretrainConfig
from semilens.io import read_json
from semilens.vlm import generic_task
from semilens.vlm.families import get_family
from semilens.vlm.labels import IGNORE, check_image_tokens
from semilens.vlm.prepare import prepare_vlm, validate_real_base

FAMILY = "qwen2_5_vl"


def _cfg(tmp_path, steps=6, base="tiny") -> Config:
    paths = PathsConfig(models=tmp_path / "models", metrics=tmp_path / "metrics", logs=tmp_path / "logs")
    return Config(
        paths=paths,
        prepare_vlm=PrepareVLMConfig(
            bases={FAMILY: base},
            tiny=TinyVLMConfig(vocab_size=600),
            pretrain=VLMPretrainConfig(steps=steps, batch_size=4, eval_samples=4, warmup_steps=2),
        ),
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    cfg = _cfg(tmp)
    summary = prepare_vlm(cfg, FAMILY)
    return cfg, summary, cfg.paths.models / FAMILY / "base"


def test_tiny_preset_is_a_real_qwen2_5_vl_checkpoint(tiny):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg, summary, folder = tiny
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "semilens_config.yaml",
    } <= names
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    from semilens.vlm.qwen2_5_vl import check_token_ids

    check_token_ids(model.config, processor)
    # grouped-query attention as configured
    text = model.config.get_text_config()
    assert text.num_key_value_heads < text.num_attention_heads

    sample = generic_task.sample(random.Random(1))
    prompt = processor.apply_chat_template(
        generic_task.conversation(sample, turns=1)[:1], add_generation_prompt=True, tokenize=False
    )
    assert "<|vision_start|><|image_pad|><|vision_end|>" in prompt
    inputs = processor(text=[prompt], images=[[sample.image]], return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == int(inputs["image_grid_thw"].prod()) // 4 == 16
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]

    metrics = read_json(cfg.paths.metrics / "vlm" / f"prepare_{FAMILY}.json")
    curve = [p["loss"] for p in metrics["loss_curve"]]
    assert curve[-1] < curve[0]  # the generic pretraining does learn
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())


def test_only_answer_tokens_carry_the_loss(tiny):
    from transformers import AutoProcessor

    _, _, folder = tiny
    processor = AutoProcessor.from_pretrained(folder)
    samples = [generic_task.sample(random.Random(i)) for i in range(3)]
    chats = [generic_task.conversation(s) for s in samples]
    batch = get_family(FAMILY).encode(processor, chats, [[s.image] for s in samples])
    labels = batch["labels"]
    tok = processor.tokenizer
    for i, s in enumerate(samples):
        supervised = tok.decode(batch["input_ids"][i][labels[i] != IGNORE])
        assert supervised == "".join(f"{a}<|im_end|>\n" for _, a in s.qa)
    image_id = processor.image_token_id
    assert (labels[batch["input_ids"] == image_id] == IGNORE).all()
    assert (labels[batch["attention_mask"] == 0] == IGNORE).all()


def test_truncated_image_tokens_are_refused():
    ids = torch.tensor([[5, 9, 9, 9, 6]])
    check_image_tokens(ids, 9, 3)
    with pytest.raises(ValueError, match="image tokens truncated"):
        check_image_tokens(ids, 9, 4)


def test_real_base_is_validated_and_referenced(tiny, tmp_path):
    _, _, folder = tiny
    real = tmp_path / "real"
    shutil.copytree(folder, real)
    cfg = _cfg(tmp_path / "run", base=str(real))
    summary = prepare_vlm(cfg, FAMILY)
    out = cfg.paths.models / FAMILY / "base"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", SOURCE_FILE]  # weights are not copied
    source = read_json(out / SOURCE_FILE)
    card = (out / "README.md").read_text()
    assert str(real.resolve()) in card and source["config_sha256"] in card
    assert source["config_sha256"] == summary["config_sha256"] and len(source["config_sha256"]) == 64
    assert resolve_checkpoint(out) == real.resolve()


def test_bad_real_bases_get_a_clear_reason(tiny, tmp_path):
    _, _, folder = tiny
    family = get_family(FAMILY)
    with pytest.raises(ValueError, match="no config.json"):
        validate_real_base(tmp_path, family)
    wrong = tmp_path / "wrong"
    shutil.copytree(folder, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["model_type"] = "llama"
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        validate_real_base(wrong, family)
    nosafe = tmp_path / "nosafe"
    shutil.copytree(folder, nosafe)
    (nosafe / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="safetensors"):
        validate_real_base(nosafe, family)
    with pytest.raises(ValueError, match="unknown VLM family"):
        get_family("gpt")


def test_texture_answers_match_what_was_drawn():
    import numpy as np

    rnd = random.Random(3)
    seen = set()
    for _ in range(200):
        s = generic_task.texture_sample(rnd, 112)
        answers = dict(s.qa)
        pattern = answers[generic_task.TEXTURE_QUESTIONS[0]]
        seen.add(pattern)
        regular = answers[generic_task.TEXTURE_QUESTIONS[1]]
        assert regular == ("regular" if generic_task.PATTERNS[pattern] else "irregular")
        grey = np.asarray(s.image.convert("L"), np.float32)
        if pattern == "plain":
            assert grey.std() < 2 and answers[generic_task.TEXTURE_QUESTIONS[2]] == "little"
        else:
            assert grey.std() > 5, pattern  # something is drawn
    assert seen == set(generic_task.PATTERNS)
    # every word the task answers with is in the tokenizer corpus
    corpus = " ".join(generic_task.phrasings())
    assert all(p in corpus for p in generic_task.PATTERNS)


def test_a_tiny_override_sets_this_familys_input_size(tmp_path):
    from PIL import Image
    from transformers import AutoProcessor

    base = _cfg(tmp_path, steps=1)
    pcfg = base.prepare_vlm.model_copy(update={"tiny_overrides": {FAMILY: {"max_pixels": 336 * 336}}})
    cfg = base.model_copy(update={"prepare_vlm": pcfg})
    prepare_vlm(cfg, FAMILY)
    folder = cfg.paths.models / FAMILY / "base"
    processor = AutoProcessor.from_pretrained(folder)
    assert processor.image_processor.size["longest_edge"] == 336 * 336
    # a 384-px micrograph goes in at 336 px: 24x24 patches, 144 image tokens
    grid = processor.image_processor(images=[Image.new("RGB", (384, 384))], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 24, 24]]
    assert "max_pixels: 112896" in (folder / "semilens_config.yaml").read_text()
