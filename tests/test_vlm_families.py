"""Every VLM family through the shared code, on its tiny preset and tiny VQA rows.

Per family: the preset is the real architecture (Auto classes load it, ids agree);
answer tokens alone carry the loss, computed from logits at the labelled positions
only; no image token is ever cut (a max_length that would
cut one is refused); prepare -> fine-tune -> evaluate runs and writes what it should.
The Qwen2.5-VL specifics are tested in test_vlm_prepare / test_vlm_finetune, PaliGemma's
prefix and suffix in test_vlm_paligemma.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_vlm_finetune import _annotation, _config, _png

from semilens.images.split import rows_for_image, write_parquet
from semilens.io import read_json
from semilens.training import supervised_forward, supervised_positions
from semilens.vlm.evaluate import evaluate_vlm
from semilens.vlm.families import FAMILIES, get_family
from semilens.vlm.finetune import finetune_vlm, make_collator
from semilens.vlm.labels import IGNORE
from semilens.vlm.prepare import prepare_vlm

# what closes an answer: each chat template's turn end, PaliGemma's <eos>
TURN_END = {"qwen2_5_vl": "<|im_end|>\n", "mllama": "<|eot_id|>", "paligemma": "<eos>"}
MODEL_CLASS = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "mllama": "MllamaForConditionalGeneration",
    "paligemma": "PaliGemmaForConditionalGeneration",
}


def test_every_family_is_covered_here():
    assert set(FAMILIES) == set(TURN_END) == set(MODEL_CLASS)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_run(request, tmp_path_factory):
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    cfg = _config(tmp, steps=4, save_steps=2)
    prepare_vlm(cfg, name)
    rows = [r for i in range(4) for r in rows_for_image(_annotation(i), _png(i), "s")]
    cfg.paths.vqa.mkdir(parents=True)
    write_parquet(rows, cfg.paths.vqa / "train.parquet")
    write_parquet(rows[:6], cfg.paths.vqa / "test.parquet")
    return name, cfg


def _rows(cfg, name, n):
    import datasets
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(cfg.paths.models / name / "base")
    ds = datasets.Dataset.from_parquet(str(cfg.paths.vqa / "train.parquet"))
    return processor, [{"messages": ds[i]["messages"], "images": ds[i]["images"]} for i in range(n)]


@pytest.mark.e2e
def test_the_preset_is_the_real_architecture(family_run):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name, cfg = family_run
    folder = cfg.paths.models / name / "base"
    assert json.loads((folder / "config.json").read_text())["model_type"] == get_family(name).model_type
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model).__name__ == MODEL_CLASS[name]
    processor = AutoProcessor.from_pretrained(folder)
    tok = processor.tokenizer
    # the image token is one token the processor and the model agree on
    assert len(tok(tok.convert_ids_to_tokens(processor.image_token_id), add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.e2e
def test_answer_tokens_alone_carry_the_loss(family_run):
    name, cfg = family_run
    processor, examples = _rows(cfg, name, 3)
    batch = make_collator(processor, get_family(name), max_length=512)([dict(e) for e in examples])
    tok = processor.tokenizer
    for i, ex in enumerate(examples):
        supervised = tok.decode(batch["input_ids"][i][batch["labels"][i] != IGNORE])
        assert supervised == ex["messages"][1]["content"][0]["text"] + TURN_END[name]
    image = batch["input_ids"] == processor.image_token_id
    assert int(image.sum()) >= 3 and (batch["labels"][image] == IGNORE).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    # one BOS at most: the chat template writes the special tokens, the tokenizer adds none
    if tok.bos_token_id is not None:
        assert (batch["input_ids"] == tok.bos_token_id).sum(-1).max() == 1


@pytest.mark.e2e
def test_the_loss_from_labelled_positions_is_the_models_own(family_run):
    import torch
    from transformers import AutoModelForImageTextToText

    name, cfg = family_run
    processor, examples = _rows(cfg, name, 3)
    batch = make_collator(processor, get_family(name), max_length=512)([dict(e) for e in examples])
    model = AutoModelForImageTextToText.from_pretrained(cfg.paths.models / name / "base")

    def loss_and_grad(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), model.get_output_embeddings().weight.grad.clone()

    full, full_grad = loss_and_grad(lambda: model(**batch).loss)
    loss, grad = loss_and_grad(lambda: supervised_forward(model, batch)[0])
    torch.testing.assert_close(loss, full)
    torch.testing.assert_close(grad, full_grad)
    # fewer logits than positions: image tokens and prompts get none
    _, outputs = supervised_forward(model, batch)
    assert outputs.logits.shape[1] == len(supervised_positions(batch["labels"])) < batch["input_ids"].shape[1]
    # with the Trainer's token count: the sum over that count
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    torch.testing.assert_close(supervised_forward(model, batch, num_items_in_batch=2 * n)[0], full / 2)


@pytest.mark.e2e
def test_no_image_token_is_ever_cut(family_run):
    name, cfg = family_run
    processor, examples = _rows(cfg, name, 2)
    collate = make_collator(processor, get_family(name), max_length=512)
    full = collate([dict(e) for e in examples])["input_ids"]
    first_image = int((full[0] == processor.image_token_id).nonzero()[0])
    # A max_length that ends inside or before the image tokens, and one that cuts only the
    # answer: each is refused with a reason, never trained on.
    for max_length in (first_image, int(full.shape[1]) - 2):
        with pytest.raises(ValueError, match="truncat|max_length|Mismatch"):
            make_collator(processor, get_family(name), max_length=max_length)([dict(e) for e in examples])


@pytest.mark.e2e
def test_fine_tune_and_evaluate(family_run):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    name, cfg = family_run
    summary = finetune_vlm(cfg, name)
    assert summary["steps"] == 4 and summary["trainable_parameters"] > 0
    models = cfg.paths.models / name
    base = AutoModelForImageTextToText.from_pretrained(models / "base")
    adapted = PeftModel.from_pretrained(base, models / "adapter")
    assert any("lora_" in n for n, _ in adapted.named_parameters())
    assert (
        AutoModelForImageTextToText.from_pretrained(models / "merged").config.model_type == get_family(name).model_type
    )
    evaluate_vlm(cfg, name)
    report = read_json(cfg.paths.metrics / "vlm" / f"{name}.json")
    assert report["n_test_rows"] == 6
    for model in ("base", "finetuned"):
        assert 0 <= report[model]["vqa_accuracy"] <= 1 and report[model]["n_vqa"] == 4


def _evaluation(vqa: tuple[float, float], rouge: tuple[float, float], cls: tuple[float, float]) -> dict:
    def model(i: int) -> dict:
        return {
            "vqa_accuracy": vqa[i],
            "vqa_macro_accuracy": vqa[i],
            "class_accuracy": cls[i],
            "caption_rouge_l": rouge[i],
            "caption_bleu": 100 * rouge[i],
            "caption_bertscore_f1": 0.5 + rouge[i] / 2,
            "vqa_per_type": {"class": {"n": 5, "accuracy": cls[i]}, "count": {"n": 5, "accuracy": vqa[i]}},
        }

    return {"base": model(0), "finetuned": model(1), "n_test_rows": 10}


def test_compare_puts_families_side_by_side_and_checks_each_margin(tmp_path):
    import csv

    from semilens.config import Config, PathsConfig, PrepareVLMConfig
    from semilens.io import write_json
    from semilens.vlm.compare import compare_vlm

    cfg = Config(
        paths=PathsConfig(metrics=tmp_path),
        prepare_vlm=PrepareVLMConfig(bases={"qwen2_5_vl": "tiny", "mllama": "tiny"}),
    )
    # qwen clears every margin; mllama's VQA is 0.45 (under 0.5) and its class accuracy 0.6
    write_json(tmp_path / "vlm" / "qwen2_5_vl.json", _evaluation((0.01, 0.62), (0.01, 0.66), (0.0, 0.82)))
    write_json(tmp_path / "vlm" / "mllama.json", _evaluation((0.2, 0.45), (0.1, 0.5), (0.0, 0.6)))
    summary = compare_vlm(cfg)
    assert summary == {"families": 2, "qwen2_5_vl_margins_hold": True, "mllama_margins_hold": False}
    out = read_json(tmp_path / "vlm" / "compare.json")
    assert out["margins"]["mllama"] == {
        "vqa_at_least_2x_base": True,
        "vqa_at_least_0.5": False,
        "rouge_l_gain_at_least_0.2": True,
        "class_accuracy_at_least_0.8": False,
        "all": False,
    }
    assert out["metrics"]["qwen2_5_vl"]["caption_rouge_l"] == {"base": 0.01, "finetuned": 0.66, "delta": 0.65}
    assert out["per_type"]["mllama"]["class"] == {"base": 0.0, "finetuned": 0.6}
    rows = list(csv.DictReader((tmp_path / "vlm" / "compare.csv").open()))
    assert {(r["family"], r["model"]) for r in rows} == {
        (f, m) for f in ("qwen2_5_vl", "mllama") for m in ("base", "finetuned")
    }
    assert "caption_bleu" not in {r["metric"] for r in rows}  # 0-100: kept out of the 0-1 plot
    types = list(csv.DictReader((tmp_path / "vlm" / "compare_types.csv").open()))
    assert len(types) == 2 * 2 * 2
    # a family without an evaluation is named, not skipped
    (tmp_path / "vlm" / "mllama.json").unlink()
    with pytest.raises(FileNotFoundError, match="evaluate_vlm@mllama"):
        compare_vlm(cfg)


def test_gpu_check_prepares_each_path_and_refuses_without_cuda(tmp_path, capsys):
    import importlib.util

    import torch

    from semilens.gpu_check import PATHS, case_config, main
    from semilens.vlm.finetune import BackendError, select_backend

    want = {
        "bf16": ("transformers", "none"),
        "qlora": ("transformers", "4bit"),
        "unsloth": ("unsloth", "none"),
        "fsdp": ("transformers", "none"),
        "zero3": ("transformers", "none"),
    }
    for path in PATHS:
        case = case_config(tmp_path, tmp_path / "vqa", "mllama", path, 3)
        trainer = case.finetune_vlm.trainer
        assert (trainer.backend, trainer.quantization, trainer.max_steps) == (*want[path], 3)
        # the sharded cases run under their recipe, which is part of their run's identity
        recipe = f"presets/accelerate/{path}.yaml" if path in ("fsdp", "zero3") else None
        assert case.launch.accelerate_config == recipe and (recipe is None or Path(recipe).is_file())
        # what the stage makes of it on a CUDA machine with the gpu extra installed
        if path in ("bf16", "fsdp", "zero3") or importlib.util.find_spec(
            {"qlora": "bitsandbytes", "unsloth": "unsloth"}[path]
        ):
            setup = select_backend(trainer, cuda=True)
            assert setup["bf16"] and (setup["backend"], setup["quantization"]) == want[path]
        else:
            with pytest.raises(BackendError, match="pip install -e '.\\[gpu\\]'"):
                select_backend(trainer, cuda=True)
    if not torch.cuda.is_available():
        assert main(["--work", str(tmp_path / "w"), "--out", str(tmp_path / "out.json")]) == 2
        assert "no CUDA device" in capsys.readouterr().out
        assert not (tmp_path / "out.json").exists() and not (tmp_path / "w").exists()
