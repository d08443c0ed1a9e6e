"""finetune_vlm on the tiny Qwen2.5-VL preset and a tiny VQA split: the real TRL + PEFT path.

Checks what the stage wrote (adapter, merged checkpoint, loss curve), that answer tokens
alone carry the loss, that image tokens are never truncated, that a killed run resumes
from its last checkpoint, and that impossible backends are refused with a reason.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from semilens.config import (
    Config,
    FinetuneVLMConfig,
    LoraConfigSection,
    PathsConfig,
    PrepareVLMConfig,
    TinyVLMConfig,
    TrainerSection,
    VLMPretrainConfig,
)
from semilens.images.split import rows_for_image, write_parquet
from semilens.io import read_json
from semilens.vlm.evaluate import evaluate_vlm
from semilens.vlm.families import get_family
from semilens.vlm.finetune import (
    BackendError,
    augment_example,
    dihedral,
    finetune_vlm,
    image_conversations,
    make_collator,
    select_backend,
    turn_angles,
)
from semilens.vlm.labels import IGNORE
from semilens.vlm.prepare import prepare_vlm

FAMILY = "qwen2_5_vl"


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.full((96, 96), 40, np.uint8)
    yy, xx = np.mgrid[:96, :96]
    for cy, cx in rng.integers(10, 86, (6, 2)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = 220
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _annotation(i: int) -> dict:
    return {
        "id": f"img{i}",
        "group": f"img{i}",
        "label": "particles",
        # Odd images are drawn by the project, even ones are a user's micrographs.
        "source": f"data/synthetic/images/particles/img{i}.tif" if i % 2 else f"data/raw/images/img{i}.png",
        "sha256": f"{i:064x}",
        "page": 0,
        "png": "unused",
        "caption": f"SEM image of particles: {6 + i} particles, median diameter 10 nm.",
        "qa": [
            {
                "type": "class",
                "question": "What kind of morphology does this micrograph show?",
                "answer": "particles",
                "value": "particles",
                "unit": None,
                "grounding": {"label": "particles"},
            },
            {
                "type": "count",
                "question": "How many particles are visible in the image?",
                "answer": str(6 + i),
                "value": 6 + i,
                "unit": None,
                "grounding": {"object_count": 6 + i},
            },
        ],
    }


def _config(tmp, steps=6, save_steps=3, **trainer) -> Config:
    paths = PathsConfig(
        models=tmp / "models", metrics=tmp / "metrics", logs=tmp / "logs", vqa=tmp / "vqa", cache=tmp / "cache"
    )
    return Config(
        paths=paths,
        prepare_vlm=PrepareVLMConfig(
            tiny=TinyVLMConfig(vocab_size=600), pretrain=VLMPretrainConfig(steps=2, batch_size=2, eval_samples=0)
        ),
        finetune_vlm=FinetuneVLMConfig(
            lora=LoraConfigSection(r=4, alpha=8),
            trainer=TrainerSection(max_steps=steps, batch_size=2, save_steps=save_steps, logging_steps=1, **trainer),
        ),
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    cfg = _config(tmp)
    prepare_vlm(cfg, FAMILY)
    rows = [r for i in range(4) for r in rows_for_image(_annotation(i), _png(i), "s")]
    cfg.paths.vqa.mkdir(parents=True)
    write_parquet(rows, cfg.paths.vqa / "train.parquet")
    write_parquet(rows[:6], cfg.paths.vqa / "test.parquet")
    summary = finetune_vlm(cfg, FAMILY)
    return cfg, summary


@pytest.mark.e2e
def test_stage_writes_adapter_merged_and_loss_curve(run):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg, summary = run
    models = cfg.paths.models / FAMILY
    assert summary["steps"] == 6 and summary["resumed_from"] is None
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]
    curve = (cfg.paths.metrics / "vlm" / f"loss_{FAMILY}.csv").read_text().splitlines()
    assert curve[0] == "step,loss" and len(curve) == 7
    assert read_json(cfg.paths.metrics / "vlm" / f"train_{FAMILY}.json")["steps"] == 6
    assert (models / "adapter" / "semilens_config.yaml").is_file()

    # Compare in float32: on CUDA the merged checkpoint is saved in bf16 (the training dtype).
    base = AutoModelForImageTextToText.from_pretrained(models / "base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, models / "adapter").eval()
    lora = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert lora and all("language_model" in n for n in lora)  # vision tower stays frozen
    merged = AutoModelForImageTextToText.from_pretrained(models / "merged", dtype=torch.float32).eval()
    saved_bf16 = json.loads((models / "merged" / "config.json").read_text()).get("dtype") == "bfloat16"
    assert not any("lora" in k for k in merged.state_dict())
    processor = AutoProcessor.from_pretrained(models / "merged")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this micrograph."}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[[Image.open(io.BytesIO(_png(9))).convert("RGB")]], return_tensors="pt")
    with torch.no_grad():
        a, b = peft_model(**inputs).logits, merged(**inputs).logits
    assert torch.allclose(a, b, atol=5e-2 if saved_bf16 else 1e-4)


def _first_rows(cfg: Config, n: int):
    """The base's processor and the first ``n`` training rows as collator examples."""
    import datasets
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(cfg.paths.models / FAMILY / "base")
    ds = datasets.Dataset.from_parquet(str(cfg.paths.vqa / "train.parquet"))
    return processor, ds, [{"messages": ds[i]["messages"], "images": ds[i]["images"]} for i in range(n)]


@pytest.mark.e2e
def test_answer_tokens_alone_carry_the_loss_and_images_are_never_cut(run):
    cfg, _ = run
    processor, _, examples = _first_rows(cfg, 3)
    collator = make_collator(processor, get_family(FAMILY), max_length=512)
    batch = collator([dict(e) for e in examples])
    tok = processor.tokenizer
    for i, ex in enumerate(examples):
        supervised = tok.decode(batch["input_ids"][i][batch["labels"][i] != IGNORE])
        assert supervised == ex["messages"][1]["content"][0]["text"] + "<|im_end|>\n"
    assert (batch["labels"][batch["input_ids"] == processor.image_token_id] == IGNORE).all()
    # A max_length that would cut the answer (or the image) is refused, never trained on.
    with pytest.raises(ValueError, match="truncat|max_length|Mismatch"):
        make_collator(processor, get_family(FAMILY), max_length=30)([dict(e) for e in examples])


def test_the_eight_symmetries_are_distinct_and_keep_every_pixel():
    img = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    seen = {dihedral(img, k).tobytes() + bytes(dihedral(img, k).size) for k in range(8)}
    assert len(seen) == 8  # no two transforms coincide on an asymmetric image
    for k in range(8):
        assert sorted(dihedral(img, k).tobytes()) == sorted(img.tobytes())  # moved, never resampled
    assert dihedral(img, 0) is img


def test_turned_answers_state_the_orientation_the_measure_stage_finds_in_the_turned_image():
    """The angle rewrite is checked against measurement, not against itself: a synthetic
    grating and a fibre image are measured as drawn and under each symmetry, and the
    rewritten answer must agree with what measure_images reports for the turned pixels."""
    from semilens.config import MeasureImagesConfig, SynthImagesConfig
    from semilens.images.measure import measure_array
    from semilens.images.synth import render_image

    def axis_gap(a: float, b: float) -> float:
        d = abs(a - b) % 180
        return min(d, 180 - d)

    synth = SynthImagesConfig()
    checked = 0
    for label, index in (("lines", 0), ("lines", 3), ("fibres", 1)):
        img = render_image(label, index, synth)
        frame = img.pixels[: -img.sidecar.ground_truth.databar_height_px]
        base = measure_array(frame, MeasureImagesConfig(), label=label).orientation_deg
        if base is None or axis_gap(base, 45) < 10:
            continue  # near the diagonal a mirror and a turn look alike: not a sharp test
        for k in range(8):
            turned = np.asarray(dihedral(Image.fromarray(frame), k))
            found = measure_array(turned, MeasureImagesConfig(), label=label).orientation_deg
            said = float(turn_angles(f"aligned near {base:.0f}°", k).split()[-1].rstrip("°"))
            assert axis_gap(said, found) <= 3, (label, index, k, base, said, found)
            checked += 1
    assert checked >= 16


def test_augmenting_a_chat_turns_its_image_and_its_angles_together():
    chat = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Shape at 37°?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "elongated, aligned near 37°, 12 lines"}]},
        ],
        "images": [Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4))],
    }
    assert augment_example(chat, 0) is chat
    turned = augment_example(chat, 3)
    assert turned["messages"][1]["content"][0]["text"] == "elongated, aligned near 127°, 12 lines"
    assert turned["messages"][0] == chat["messages"][0]  # questions are left as asked
    assert turned["images"][0].size == (3, 4) and chat["images"][0].size == (4, 3)  # the original untouched
    assert augment_example(chat, 1)["messages"][1]["content"][0]["text"].startswith("elongated, aligned near 143°")


@pytest.mark.e2e
def test_augmentation_turns_the_pixels_and_leaves_text_and_labels_alone(run):
    cfg, _ = run
    processor, ds, examples = _first_rows(cfg, 4)
    plain = make_collator(processor, get_family(FAMILY), max_length=512)([dict(e) for e in examples])
    turned = make_collator(processor, get_family(FAMILY), max_length=512, augment_seed=0)([dict(e) for e in examples])
    again = make_collator(processor, get_family(FAMILY), max_length=512, augment_seed=0)([dict(e) for e in examples])
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(plain[key], turned[key])
    assert not torch.equal(plain["pixel_values"], turned["pixel_values"])  # some image was turned
    assert torch.equal(turned["pixel_values"], again["pixel_values"])  # the same seed, the same turns
    assert examples[0]["images"][0].tobytes() == ds[0]["images"][0].tobytes()  # the dataset's image untouched


@pytest.mark.e2e
def test_image_conversations_supervise_every_answer_once_per_opening(run):
    import datasets
    from transformers import AutoProcessor

    from semilens.images.split import CAPTION_PROMPTS

    cfg, _ = run
    rows = datasets.Dataset.from_parquet(str(cfg.paths.vqa / "train.parquet"))
    chats = image_conversations(rows, seed=0)
    assert len(chats) == len(rows)  # one chat per (image, opening question)
    by_image: dict[str, set] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], set()).add((r["question"], r["answer"]))
    openers = []
    for chat in chats:
        msgs = chat["messages"]
        users = [m for m in msgs if m["role"] == "user"]
        assert [c["type"] for c in users[0]["content"]] == ["image", "text"]
        assert all(c["type"] == "text" for u in users[1:] for c in u["content"])
        pairs = {(u["content"][-1]["text"], a["content"][0]["text"]) for u, a in zip(msgs[::2], msgs[1::2])}
        image = next(i for i, qa in by_image.items() if qa == pairs)  # exactly one image's Q&A
        openers.append((image, users[0]["content"][-1]["text"]))
        questions = [u["content"][-1]["text"] for u in users]
        # a caption (restating the measurements) only ever opens or closes a chat
        assert all(q not in CAPTION_PROMPTS for q in questions[1:-1])
        assert len(chat["images"]) == 1
    assert len(set(openers)) == len(rows)  # every question opens exactly one chat
    # the collator supervises every answer of a multi-turn chat, and only those
    processor = AutoProcessor.from_pretrained(cfg.paths.models / FAMILY / "base")
    batch = make_collator(processor, get_family(FAMILY), max_length=1024)([dict(chats[0])])
    supervised = processor.tokenizer.decode(batch["input_ids"][0][batch["labels"][0] != IGNORE])
    answers = [m["content"][0]["text"] for m in chats[0]["messages"] if m["role"] == "assistant"]
    assert supervised == "".join(f"{a}<|im_end|>\n" for a in answers)


@pytest.mark.e2e
def test_finished_run_is_reused_not_trained_again(run):
    """DVC re-runs the stage when a dependency that does not touch training changes (a
    model-card template, say); the finished run's weights and record are taken as they
    are. Resuming from the final checkpoint instead reported another run (resumed from
    it, a loss of 0), and where max_steps ends mid-epoch trained one step past it."""
    cfg, summary = run
    models = cfg.paths.models / FAMILY
    outputs = [models / "adapter", models / "merged", cfg.paths.metrics / "vlm"]

    def snapshot():
        return {p: p.read_bytes() for d in outputs for p in sorted(d.rglob("*")) if p.is_file()}

    before = snapshot()
    again = finetune_vlm(cfg, FAMILY)
    assert again == summary and again["steps"] == 6
    assert snapshot() == before


@pytest.mark.e2e
def test_killed_run_resumes_from_its_last_checkpoint(run):
    cfg, _ = run
    ckpt_root = next((cfg.paths.cache / "finetune_vlm" / FAMILY).iterdir())
    assert {p.name for p in ckpt_root.iterdir() if p.name.startswith("checkpoint-")} >= {"checkpoint-6"}
    # Emulate a kill after step 3: the step-6 checkpoint never got written.
    shutil.rmtree(ckpt_root / "checkpoint-6")
    summary = finetune_vlm(cfg, FAMILY)
    assert summary["resumed_from"] == "checkpoint-3" and summary["steps"] == 6


@pytest.mark.e2e
def test_changed_params_do_not_resume_foreign_state(run, tmp_path):
    cfg, _ = run
    other = cfg.model_copy(
        update={"finetune_vlm": cfg.finetune_vlm.model_copy(update={"lora": LoraConfigSection(r=2, alpha=4)})}
    )
    summary = finetune_vlm(other, FAMILY)
    assert summary["resumed_from"] is None


@pytest.mark.e2e
def test_two_processes_follow_the_one_process_loss_curve(run, tmp_path):
    """params.yaml's launch relaunches the stage through `accelerate launch` (DDP over
    gloo, one writer): two processes of 2 rows each take the steps one process of 4 takes."""
    cfg, _ = run
    root = Path(__file__).resolve().parents[1]
    curves = {}
    for name, batch, processes in (("one", 4, 1), ("two", 2, 2)):
        where = tmp_path / name
        # The split it trains on lies in the module's folder, beside this one: outside the
        # params file's folder, so the run allows it explicitly.
        paths = cfg.paths.model_copy(
            update={n: where / n for n in ("models", "metrics", "logs", "cache")} | {"allow_outside": True}
        )
        shutil.copytree(cfg.paths.models / FAMILY / "base", paths.models / FAMILY / "base")
        # no LoRA dropout and no augmentation: each process would draw its own masks and turns
        fcfg = cfg.finetune_vlm.model_copy(
            update={
                "augment": False,
                "lora": cfg.finetune_vlm.lora.model_copy(update={"dropout": 0.0}),
                "trainer": cfg.finetune_vlm.trainer.model_copy(
                    update={"max_steps": 4, "batch_size": batch, "save_steps": 4, "learning_rate": 0.05}
                ),
            }
        )
        params = cfg.model_copy(update={"paths": paths, "finetune_vlm": fcfg}).model_dump(mode="json")
        params["launch"] = {"processes": processes, "accelerate_config": None}
        (where / "params.yaml").write_text(yaml.safe_dump(params))
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "stages.finetune_vlm", FAMILY],
            cwd=where,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        summary = read_json(paths.metrics / "vlm" / f"train_{FAMILY}.json")
        assert summary["processes"] == processes and summary["steps"] == 4
        assert (paths.models / FAMILY / "adapter" / "adapter_model.safetensors").is_file()
        assert (paths.models / FAMILY / "merged" / "model.safetensors").is_file()
        assert read_json(paths.logs / f"finetune_vlm@{FAMILY}.json")["processes"] == processes
        rows = (paths.metrics / "vlm" / f"loss_{FAMILY}.csv").read_text().splitlines()[1:]
        curves[name] = [tuple(map(float, r.split(","))) for r in rows]
    assert [s for s, _ in curves["one"]] == [s for s, _ in curves["two"]] == [1, 2, 3, 4]
    # the same rows in each step's global batch; only float summation order differs (the
    # losses are logged to 4 decimals; a global batch of 8 rows instead of 4 parts by 1e-3)
    assert [v for _, v in curves["two"]] == pytest.approx([v for _, v in curves["one"]], abs=2e-4)


def test_impossible_backends_are_refused_with_a_reason():
    with pytest.raises(BackendError, match="QLoRA.*CUDA"):
        select_backend(TrainerSection(quantization="4bit"), cuda=False)
    with pytest.raises(BackendError, match="bf16"):
        select_backend(TrainerSection(precision="bf16"), cuda=False)
    assert select_backend(TrainerSection(), cuda=False)["bf16"] is False
    assert select_backend(TrainerSection(), cuda=False)["backend"] == "transformers"
    with pytest.raises(BackendError, match="unsloth needs a CUDA GPU"):
        select_backend(TrainerSection(backend="unsloth"), cuda=False)
    assert select_backend(TrainerSection(), cuda=True)["bf16"] is True


@pytest.mark.e2e
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_step_on_cuda(run, tmp_path):
    cfg, _ = run
    gpu_cfg = cfg.model_copy(
        update={
            "paths": cfg.paths.model_copy(update={"models": tmp_path / "models", "cache": tmp_path / "cache"}),
            "finetune_vlm": cfg.finetune_vlm.model_copy(
                update={"trainer": TrainerSection(max_steps=2, batch_size=2, quantization="4bit", save_steps=2)}
            ),
        }
    )
    shutil.copytree(cfg.paths.models / FAMILY / "base", tmp_path / "models" / FAMILY / "base")
    summary = finetune_vlm(gpu_cfg, FAMILY)
    assert summary["quantization"] == "4bit" and summary["bf16"] is True and summary["steps"] == 2


@pytest.mark.e2e
def test_evaluate_scores_base_and_finetuned_side_by_side(run):
    import json

    cfg, _ = run
    summary = evaluate_vlm(cfg, FAMILY)
    report = read_json(cfg.paths.metrics / "vlm" / f"{FAMILY}.json")
    assert summary["n_test_rows"] == report["n_test_rows"] == 6
    for model in ("base", "finetuned"):
        m = report[model]
        assert m["n_captions"] == 2 and m["n_vqa"] == 4
        assert 0 <= m["vqa_accuracy"] <= 1 and 0 <= m["caption_rouge_l"] <= 1
        assert set(m["vqa_per_type"]) == {"class", "count"}
        assert m["caption_bertscore_f1"] is not None
    preds = [json.loads(line) for line in (cfg.paths.models / FAMILY / "eval" / "predictions.jsonl").open()]
    assert len(preds) == 6
    assert all({"reference", "base", "finetuned", "source", "question"} <= set(p) for p in preds)
    assert set(report["delta"]) >= {"vqa_accuracy", "caption_rouge_l"}
    # The test rows are images 0 (real) and 1 (synthetic), three rows each, scored apart.
    for kind in ("real", "synthetic"):
        block = report[kind]
        assert block["n_rows"] == 3 and block["n_images"] == 1
        assert block["base"]["n_captions"] == 1 and block["finetuned"]["n_vqa"] == 2
    assert [p["origin"] for p in preds] == ["real"] * 3 + ["synthetic"] * 3


def test_origin_tells_drawn_images_from_real_ones():
    from semilens.vlm.evaluate import origin

    root = "data/synthetic/images"
    assert origin("data/synthetic/images/particles/a.tif", root) == "synthetic"
    assert origin("data/synthetic/images/", root + "/") == "synthetic"
    assert origin("data/raw/images/sem/a.tif", root) == "real"
    assert origin("data/synthetic/images_extra/a.tif", root) == "real"


@pytest.mark.e2e
def test_predict_answers_with_merged_adapter_and_base_folders(run, tmp_path):
    import os
    import subprocess
    import sys

    from semilens.vlm.predict import predict

    cfg, _ = run
    image = tmp_path / "p.png"
    image.write_bytes(_png(11))
    models = cfg.paths.models / FAMILY
    answers = {
        kind: predict(models / kind, image, "How many particles are visible in the image?", 8)
        for kind in ("base", "merged", "adapter")
    }
    assert all(isinstance(a, str) for a in answers.values())
    assert answers["merged"] == answers["adapter"]  # the same weights, merged or not
    with pytest.raises(ValueError, match="not a readable image"):
        predict(models / "merged", tmp_path / "missing.png", "q")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "semilens.cli",
            "predict",
            str(image),
            "Describe this micrograph.",
            "--checkpoint",
            str(models / "merged"),
            "--max-new-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 0, res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "semilens.cli", "predict", str(image), "q", "--checkpoint", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert res.returncode == 2 and "not a checkpoint folder" in res.stderr
