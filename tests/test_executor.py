"""Per-item stages on worker processes: the same outputs and cache whatever the count."""

import json
import os
import shutil
from pathlib import Path

import pytest

from semilens import executor
from semilens.config import Config, ExecutorConfig
from semilens.images import measure
from semilens.text import extract


def test_map_items_keeps_the_input_order_on_any_number_of_workers():
    items = [str(i) * (i % 7 + 1) for i in range(40)]
    one = executor.map_items(len, items, executor=ExecutorConfig(workers=1), description="t")
    two = executor.map_items(len, items, executor=ExecutorConfig(workers=2), description="t")
    assert one == two == [len(s) for s in items]


def test_an_error_in_a_worker_stops_the_map_with_that_error():
    with pytest.raises(ValueError, match="invalid literal"):
        executor.map_items(int, ["1", "2", "x", "4"], executor=ExecutorConfig(workers=2), description="t")


def test_workers_zero_takes_the_share_semilens_repro_gives_the_stage(monkeypatch):
    monkeypatch.setenv(executor.STAGE_CORES_ENV, "3")
    assert executor.stage_workers(0) == 3
    assert executor.stage_workers(5) == 5
    monkeypatch.delenv(executor.STAGE_CORES_ENV)
    assert executor.stage_workers(0) == executor.available_cores()
    from semilens.repro import stage_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    share = stage_env(jobs=2)[executor.STAGE_CORES_ENV]
    assert share == str(max(1, executor.available_cores() // 2))


def _cache_entries(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.json"))}


def _with_workers(cfg: Config, n: int) -> Config:
    return cfg.model_copy(update={"executor": cfg.executor.model_copy(update={"workers": n})})


def test_measure_images_writes_the_same_bytes_and_cache_on_one_and_two_workers(tmp_path, monkeypatch):
    from test_measure import _write_inputs

    monkeypatch.chdir(tmp_path)
    cfg = Config()
    _write_inputs(cfg)
    outputs = {}
    for n in (1, 2):
        shutil.rmtree(cfg.paths.cache, ignore_errors=True)
        summary = measure.measure_images(_with_workers(cfg, n))
        assert summary["cache"] == {"hits": 0, "misses": 3}
        outputs[n] = (
            (cfg.paths.measurements / "measurements.jsonl").read_bytes(),
            (cfg.paths.metrics / "measure.json").read_bytes(),
            _cache_entries(Path(cfg.paths.cache)),
        )
    assert outputs[1] == outputs[2]
    assert len(outputs[2][2]) == 2  # two measurable images cached by the workers
    # A rerun on two workers finds every finished item in the cache the workers wrote.
    assert measure.measure_images(_with_workers(cfg, 2))["cache"] == {"hits": 2, "misses": 1}


def test_extract_pdfs_writes_the_same_pages_on_one_and_two_workers(tmp_path, monkeypatch):
    from semilens.text.corpus import synth_corpus

    shutil.copytree(Path(__file__).resolve().parents[1] / "knowledge", tmp_path / "knowledge")
    monkeypatch.chdir(tmp_path)
    cfg = Config()
    synth_corpus(cfg)
    raw = Path(cfg.paths.raw_pdfs)
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    first = sorted(Path(cfg.paths.synthetic_pdfs).rglob("*.pdf"))[0]
    shutil.copy(first, raw / "copy.pdf")  # a duplicate, settled before the workers
    outputs = {}
    for n in (1, 2):
        shutil.rmtree(cfg.paths.cache, ignore_errors=True)
        summary = extract.extract_pdfs(_with_workers(cfg, n))
        pages = Path(cfg.paths.pages)
        outputs[n] = (
            (pages / "pages.jsonl").read_bytes(),
            (pages / "quarantine.jsonl").read_bytes(),
            _cache_entries(Path(cfg.paths.cache)),
            summary,
        )
    assert outputs[1] == outputs[2]
    quarantine = [json.loads(line) for line in outputs[2][1].decode().splitlines()]
    reasons = {Path(q["source"]).name: q["reason"] for q in quarantine}
    assert reasons["broken.pdf"].startswith("truncated")
    assert [r for r in reasons.values() if r.startswith("duplicate of")] == [f"duplicate of {raw / 'copy.pdf'}"]
    assert outputs[2][3]["files"] >= 2 and outputs[2][3]["pages"] > 0
    rerun = extract.extract_pdfs(_with_workers(cfg, 2))
    assert rerun["cache"]["misses"] == 0 and rerun["cache"]["hits"] == outputs[2][3]["files"]


def test_spawned_workers_see_the_stage_environment(monkeypatch):
    # The pool starts fresh interpreters: what they inherit is the environment, not the
    # parent's imported state.
    monkeypatch.setenv("SEMILENS_TEST_MARK", "seen")
    got = executor.map_items(os.getenv, ["SEMILENS_TEST_MARK"] * 2, executor=ExecutorConfig(workers=2), description="t")
    assert got == ["seen", "seen"]


def test_ingest_images_writes_the_same_records_and_pngs_on_one_and_two_workers(tmp_path, monkeypatch):
    from semilens.images.ingest import ingest_images
    from semilens.images.synth import synth_images

    monkeypatch.chdir(tmp_path)
    cfg = Config()
    cfg = cfg.model_copy(update={"synth_images": cfg.synth_images.model_copy(update={"n_per_class": 1, "size": 160})})
    synth_images(cfg.synth_images, Path(cfg.paths.synthetic_images))
    raw = Path(cfg.paths.raw_images) / "particles"
    raw.mkdir(parents=True)
    (raw / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    first = sorted(Path(cfg.paths.synthetic_images).rglob("*.tif"))[0]
    shutil.copy(first, raw / "copy.tif")
    outputs = {}
    for n in (1, 2):
        shutil.rmtree(cfg.paths.cache, ignore_errors=True)
        summary = ingest_images(_with_workers(cfg, n))
        out = Path(cfg.paths.interim_images)
        files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        outputs[n] = files, summary["n_records"], summary["n_quarantined"], summary["cache"]
    assert outputs[1] == outputs[2]
    files, n_records, n_quarantined, cache = outputs[2]
    assert n_records == len(cfg.synth_images.classes) and n_quarantined == 2
    assert cache == {"hits": 0, "misses": n_records + 1}  # every file but the duplicate
    quarantine = files["quarantine.jsonl"].decode()
    assert "duplicate of" in quarantine and "broken.png" in quarantine
    assert " at 0x" not in quarantine  # no memory address in a reason: the same bytes each run
    # The broken file's reason is the file's own, so it is cached like a record.
    assert ingest_images(_with_workers(cfg, 2))["cache"] == {"hits": n_records + 1, "misses": 0}
