"""annotate_images and split_dataset on hand-made records and measurements.

The records/measurements here stand in for what ingest and measure write (the same typed
schema); the stages' real code runs on them and the tests assert what they wrote.
"""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semilens.config import Config, PathsConfig, SplitDatasetConfig
from semilens.images.annotate import annotate_images, fmt_number
from semilens.images.records import ImageRecord, Measurement
from semilens.images.split import assign_split, load_split, split_dataset
from semilens.io import read_json, read_jsonl, sha256_bytes, write_jsonl


def _png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (24, 24), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _record(root: Path, name: str, group: str, **kw) -> ImageRecord:
    data = _png(zlib.crc32(name.encode()))
    sha = sha256_bytes(name.encode())
    rid = f"{sha[:16]}-p0"
    png = root / "data/interim/images/png" / f"{rid}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(data)
    base = dict(
        id=rid,
        source=f"data/raw/images/{name}",
        origin="raw",
        sha256=sha,
        format="PNG",
        page=0,
        n_pages=1,
        original_width=24,
        original_height=24,
        original_dtype="uint8",
        width=24,
        height=24,
        crop_box=(0, 0, 24, 24),
        databar=None,
        modality="SEM",
        instrument={"detector": "SE"},
        pixel_size_nm=2.0,
        pixel_size_source="sidecar:json",
        label="particles",
        label_source="folder",
        group=group,
        png=str(png.relative_to(root)),
        png_sha256=sha256_bytes(data),
    )
    base.update(kw)
    return ImageRecord(**base)


def _particles(rid: str, count: int = 37, size_px: float = 21.0, px_nm: float | None = 2.0):
    return Measurement(
        id=rid,
        method="particles",
        object_count=count,
        eq_diameter_px=[size_px] * count,
        median_size_px=size_px,
        median_size_nm=None if px_nm is None else size_px * px_nm,
        circularity=0.86,
        aspect_ratio=1.2,
        area_fraction=0.23,
        pixel_size_nm=px_nm,
    )


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A tiny project: three micrographs (one tiled), one unlabelled, one blank frame."""
    monkeypatch.chdir(tmp_path)
    recs = [
        _record(tmp_path, "a_x0_y0.png", "a"),
        _record(tmp_path, "a_x1_y0.png", "a"),
        _record(tmp_path, "b.png", "b", pixel_size_nm=None, pixel_size_source="none", label=None, label_source="none"),
        _record(tmp_path, "wires/c.png", "wires/c", label="nanowires"),
        _record(
            tmp_path,
            "blank.png",
            "blank",
            low_information=True,
            low_information_reason="nearly uniform frame (std 0.4)",
        ),
    ]
    meas = [
        _particles(recs[0].id),
        _particles(recs[1].id, count=12, size_px=40.0),
        _particles(recs[2].id, px_nm=None),
        Measurement(
            id=recs[3].id,
            method="elongated",
            object_count=9,
            width_px=6.0,
            width_nm=12.0,
            length_px=60.0,
            length_nm=120.0,
            aspect_ratio=10.0,
            orientation_deg=40.0,
            orientation_spread_deg=35.0,
            area_fraction=0.08,
            pixel_size_nm=2.0,
        ),
        Measurement(id=recs[4].id, method="none", object_count=0, notes=["low information"]),
    ]
    cfg = Config(paths=PathsConfig())
    write_jsonl(cfg.paths.interim_images / "records.jsonl", [r.model_dump(mode="json") for r in recs])
    write_jsonl(cfg.paths.measurements / "measurements.jsonl", [m.model_dump(mode="json") for m in meas])
    return cfg, recs, meas


def test_every_answer_is_grounded(project):
    cfg, recs, meas = project
    summary = annotate_images(cfg)
    rows = list(read_jsonl(cfg.paths.annotations / "annotations.jsonl"))
    assert summary["n_images"] == 4 and len(rows) == 4
    by_id = {r["id"]: r for r in rows}
    m_by_id = {m.id: m for m in meas}
    for row in rows:
        types = [qa["type"] for qa in row["qa"]]
        assert len(set(types)) >= cfg.annotate_images.min_questions, types
        assert {"class", "count", "size", "shape", "coverage", "modality", "reasoning"} <= set(types)
        assert row["caption"]
        m = m_by_id[row["id"]]
        for qa in row["qa"]:
            g = qa["grounding"]
            assert g, qa
            if qa["type"] == "count":
                assert qa["value"] == g["object_count"] == m.object_count
                assert qa["answer"] == str(m.object_count)
            if qa["type"] == "coverage":
                frac = next(v for k, v in g.items())
                assert qa["value"] == round(100 * frac)
            if qa["type"] == "reasoning":
                # the yes/no answer really follows from the grounded number
                if "threshold" in g:
                    measured = (
                        next(v for k, v in g.items() if k.endswith("_nm") and v is not None)
                        if g["threshold_unit"] == "nm"
                        else next(v for k, v in g.items() if k.endswith("_px"))
                    )
                    assert qa["answer"] == ("yes" if measured > g["threshold"] else "no")
                else:
                    frac = next(v for k, v in g.items() if k != "threshold_percent")
                    assert qa["answer"] == ("yes" if 100 * frac > g["threshold_percent"] else "no")
    a = by_id[recs[0].id]
    size = next(qa for qa in a["qa"] if qa["type"] == "size")
    assert size["answer"] == f"{fmt_number(42.0)} nm" and size["unit"] == "nm"
    # no pixel size: sizes stay in pixels and say so
    b = by_id[recs[2].id]
    size = next(qa for qa in b["qa"] if qa["type"] == "size")
    assert size["unit"] == "px" and size["answer"].startswith("about 21 px")
    assert "pixel size is not known" in size["answer"] and "nm" not in size["answer"]
    assert "Pixel size unknown" in b["caption"]
    cls = next(qa for qa in b["qa"] if qa["type"] == "class")
    assert cls["answer"] == "particles" and cls["grounding"] == {"method": "particles"}
    wires = by_id[recs[3].id]
    shape = next(qa for qa in wires["qa"] if qa["type"] == "shape")
    assert shape["answer"] == "elongated, randomly oriented"
    assert next(qa for qa in wires["qa"] if qa["type"] == "size")["answer"] == "12 nm"
    # the blank frame is skipped with its reason, not silently dropped
    skipped = list(read_jsonl(cfg.paths.annotations / "skipped.jsonl"))
    assert len(skipped) == 1 and "nearly uniform" in skipped[0]["reason"]


def test_annotation_is_deterministic_and_cached(project):
    cfg, *_ = project
    first = annotate_images(cfg)
    out = (cfg.paths.annotations / "annotations.jsonl").read_bytes()
    second = annotate_images(cfg)
    assert first["cache"] == {"hits": 0, "misses": 4}
    assert second["cache"] == {"hits": 4, "misses": 0}
    assert (cfg.paths.annotations / "annotations.jsonl").read_bytes() == out


def test_phrasings_vary_across_images(project):
    cfg, *_ = project
    annotate_images(cfg)
    rows = list(read_jsonl(cfg.paths.annotations / "annotations.jsonl"))
    questions = {qa["question"] for r in rows for qa in r["qa"] if qa["type"] == "modality"}
    openings = {r["caption"].split(":")[0].split(" of ")[0] for r in rows}
    assert len(questions) + len(openings) > 2


def test_split_groups_never_straddle_and_are_stable():
    cfg = SplitDatasetConfig(val_fraction=0.3, test_fraction=0.3)
    groups = [f"img{i}" for i in range(200)]
    before = {g: assign_split(g, cfg) for g in groups}
    counts = {s: list(before.values()).count(s) for s in ("train", "val", "test")}
    assert all(40 <= c <= 100 for c in counts.values()), counts
    # adding groups never moves the existing ones
    after = {g: assign_split(g, cfg) for g in groups + [f"new{i}" for i in range(50)]}
    assert all(after[g] == before[g] for g in groups)
    # a different salt reshuffles
    other = SplitDatasetConfig(val_fraction=0.3, test_fraction=0.3, salt="other")
    assert any(assign_split(g, other) != before[g] for g in groups)


def test_split_writes_trl_vlm_datasets(project):
    cfg, recs, _ = project
    annotate_images(cfg)
    summary = split_dataset(cfg)
    sizes = read_json(cfg.paths.metrics / "split.json")
    total_rows = sum(s["rows"] for s in sizes.values())
    anns = list(read_jsonl(cfg.paths.annotations / "annotations.jsonl"))
    assert total_rows == sum(1 + len(a["qa"]) for a in anns)
    assert sum(s["images"] for s in sizes.values()) == 4
    seen_split: dict[str, str] = {}
    for split in ("train", "val", "test"):
        ds = load_split(cfg.paths.vqa, split)
        assert len(ds) == sizes[split]["rows"] == summary[f"{split}_rows"]
        for row in ds:
            # the group decides the split: tiles of "a" are together
            assert seen_split.setdefault(row["group"], split) == split
            user, assistant = row["messages"]
            assert user["role"] == "user" and user["content"][0]["type"] == "image"
            assert user["content"][1]["text"] == row["question"]
            assert assistant["content"][0]["text"] == row["answer"]
            assert len(row["images"]) == 1 and row["images"][0].size == (24, 24)
            assert json.loads(row["grounding"])
    assert {r.group for r in recs[:2]} == {"a"}


def test_split_is_byte_identical(project, tmp_path):
    cfg, *_ = project
    annotate_images(cfg)
    split_dataset(cfg)
    first = {p.name: p.read_bytes() for p in cfg.paths.vqa.iterdir()}
    split_dataset(cfg)
    assert first == {p.name: p.read_bytes() for p in cfg.paths.vqa.iterdir()}


def test_questions_never_repeat_a_word(tmp_path):
    """Every phrasing of every question type, for each morphology noun (e.g. no 'grain grain size')."""
    from semilens.images.annotate import build_qa

    cases = [
        (
            "grains",
            Measurement(
                id="x",
                method="grains",
                object_count=20,
                grain_size_px=30.0,
                grain_size_nm=60.0,
                area_fraction=0.1,
                pixel_size_nm=2.0,
            ),
        ),
        ("particles", _particles("x")),
    ]
    for label, m in cases:
        rec = _record(tmp_path, f"{label}.png", label, label=label)
        questions = {
            qa.question for seed in range(40) for qa in build_qa(rec, m.model_copy(update={"id": rec.id}), seed)
        }
        assert len([q for q in questions if "typical" in q]) >= 1
        for q in questions:
            words = q.lower().rstrip("?.").split()
            assert all(a != b for a, b in zip(words, words[1:])), q


# ---------------------------------------------------------------------------- backend: vlm


def _vlm_cfg(cfg: Config, url: str) -> Config:
    from semilens.config import AnnotateImagesConfig, EndpointConfig

    endpoint = EndpointConfig(base_url=url, model="annotator", backoff_s=0, max_reasks=1)
    return cfg.model_copy(update={"annotate_images": AnnotateImagesConfig(backend="vlm", vlm=endpoint)})


def test_the_vlm_backend_keeps_only_what_the_measurements_back_and_fills_the_rest(project):
    from conftest import ChatStub

    cfg, recs, meas = project
    annotate_images(cfg)
    grounded = {r["id"]: r for r in read_jsonl(cfg.paths.annotations / "annotations.jsonl")}
    careless = {
        "caption": "SEM image of particles: 99 particles.",
        "qa": [
            {"type": "class", "question": "What is shown in this frame?", "answer": "Particles."},
            {"type": "class", "question": "What is shown once more?", "answer": "particles"},
            {"type": "count", "question": "How many particles are there?", "answer": "About 500."},
            {"type": "pitch", "question": "What is the pitch?", "answer": "50 nm"},
            {"type": "modality", "question": "Which microscope was used?", "answer": "TEM"},
            {"type": "reasoning", "question": "Are they big ones?", "answer": "yes"},
        ],
    }
    a1 = grounded[recs[1].id]
    careful = {
        "caption": "SEM image of 12 particles, median diameter 80 nm, 23% area coverage. Pixel size 2.0 nm.",
        "qa": [
            {"type": "count", "question": "How many particles can you count?", "answer": "I count 12 particles."},
            {"type": "size", "question": "How wide is a typical particle?", "answer": "about 78 nm"},
            {
                "type": "reasoning",
                "question": next(q["question"] for q in a1["qa"] if q["type"] == "reasoning"),
                "answer": next(q["answer"] for q in a1["qa"] if q["type"] == "reasoning"),
            },
        ],
    }
    with ChatStub({"- count: 12": [json.dumps(careful)]}, default=json.dumps(careless)) as stub:
        summary = annotate_images(_vlm_cfg(cfg, stub.url))
        assert len(stub.requests) == 4  # one per annotated image (the blank frame is skipped)
        body = stub.requests[0]["body"]
        parts = body["messages"][0]["content"]
        assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert body["response_format"]["json_schema"]["name"] == "VLMAnnotation"

        rows = {r["id"]: r for r in read_jsonl(cfg.paths.annotations / "annotations.jsonl")}
        assert set(rows) == set(grounded)  # nothing lost
        for rid, row in rows.items():  # every measured type is still there, once
            assert [q["type"] for q in row["qa"]] == [q["type"] for q in grounded[rid]["qa"]]
        counts = read_json(cfg.paths.metrics / "annotate.json")["counts"]
        assert counts == {
            "caption_from_vlm": 1,
            "dropped_contradicts_caption": 3,
            # both class answers are wrong for the nanowire image; the second one only
            # counts as a duplicate where the first was kept
            "dropped_contradicts_class": 2,
            "dropped_duplicate": 2,
            "dropped_contradicts_count": 3,
            "dropped_contradicts_modality": 3,
            "dropped_unsupported": 3,
            "dropped_unverifiable": 3,
            "qa_from_vlm": 2 + 3,  # class on two particle images (a0, b); count, size, reasoning on a1
            "qa_filled_from_grounded": sum(len(r["qa"]) for r in grounded.values()) - 5,
        }
        kept = next(q for q in rows[recs[1].id]["qa"] if q["type"] == "size")
        truth = next(q for q in a1["qa"] if q["type"] == "size")
        # the model's words, the measurement's value
        assert (kept["answer"], kept["written_by"], kept["value"], kept["grounding"]) == (
            "about 78 nm",
            "vlm",
            truth["value"],
            truth["grounding"],
        )
        assert rows[recs[1].id]["caption"] == careful["caption"] and rows[recs[1].id]["caption_written_by"] == "vlm"
        assert rows[recs[0].id]["caption"] == grounded[recs[0].id]["caption"]
        assert summary["requests"]["requests_sent"] == 4

        # a re-run sends nothing: every answer is in the request cache
        again = annotate_images(_vlm_cfg(cfg, stub.url))
        assert len(stub.requests) == 4 and again["requests"]["cache_hits"] == 4
        assert list(read_jsonl(cfg.paths.annotations / "annotations.jsonl")) == list(rows.values())


def test_a_vlm_backend_without_a_server_is_refused_in_the_config():
    from semilens.config import AnnotateImagesConfig

    with pytest.raises(ValueError, match="base_url and .model"):
        AnnotateImagesConfig(backend="vlm")


KILLED_ANNOTATION = """
from semilens.config import load_config
from semilens.images.annotate import annotate_images
annotate_images(load_config("params.yaml"))
"""


def test_an_annotation_run_killed_half_way_finishes_without_repeating_a_request(project, tmp_path_factory):
    """The real stage against `semilens serve` (a tiny untrained Qwen2.5-VL, so every
    reply fails its schema and the pairs fall back to the templates): killed after two of
    four images, the re-run asks only for the two it had not finished."""
    import subprocess
    import sys
    import time

    import httpx
    import yaml

    from semilens.config import TinyVLMConfig
    from semilens.serve import ServeOptions, make_app, serve_in_background
    from semilens.tokenizer import general_corpus
    from semilens.vlm.qwen2_5_vl import build_tiny

    cfg, recs, _ = project
    folder = tmp_path_factory.mktemp("vlm") / "vlm"
    vlm, processor = build_tiny(
        TinyVLMConfig(vocab_size=600, hidden_size=32, heads=2, kv_heads=1, layers=1, vision_hidden=32, vision_depth=1),
        general_corpus(),
    )
    vlm.save_pretrained(folder)
    processor.save_pretrained(folder)
    app = make_app(folder, ServeOptions(latency_ms=700))
    with serve_in_background(app) as url:
        vcfg = _vlm_cfg(cfg, url)
        acfg = vcfg.annotate_images.model_copy(
            update={
                "vlm": vcfg.annotate_images.vlm.model_copy(
                    update={"model": app.state.model_name, "concurrency": 1, "max_reasks": 0, "max_tokens": 16}
                )
            }
        )
        vcfg = vcfg.model_copy(update={"annotate_images": acfg})
        Path("params.yaml").write_text(yaml.safe_dump(vcfg.model_dump(mode="json")))
        proc = subprocess.Popen([sys.executable, "-c", KILLED_ANNOTATION])
        answers = Path(cfg.paths.cache) / "annotate_images_vlm"
        done = lambda: len(list(answers.rglob("*.json"))) if answers.is_dir() else 0  # noqa: E731
        deadline = time.monotonic() + 120
        while done() < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        finished = done()
        assert 2 <= finished < 4, "the run should have been killed half-way"
        asked_before = httpx.get(url.removesuffix("/v1") + "/semilens/stats").json()["requests"]
        summary = annotate_images(vcfg)
        asked_after = httpx.get(url.removesuffix("/v1") + "/semilens/stats").json()["requests"]
    assert summary["requests"]["cache_hits"] == finished
    assert summary["requests"]["requests_sent"] == asked_after - asked_before == 4 - finished
    rows = list(read_jsonl(cfg.paths.annotations / "annotations.jsonl"))
    assert len(rows) == 4 and done() == 4
    # the untrained model's replies are not the JSON asked for: counted as failures (the
    # cached ones replayed too), and every pair falls back to the templates: nothing lost
    assert summary["counts"]["image_failed_invalid_output"] == 4
    assert all(q["written_by"] == "grounded" for r in rows for q in r["qa"])
