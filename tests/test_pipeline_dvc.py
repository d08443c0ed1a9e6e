"""The DVC pipeline end to end, in a real git + DVC repository, on tiny params.

Asserts the issue's guarantees: `dvc repro` builds every stage from raw files, a second
`dvc repro` does nothing and `dvc status` is clean, adding one image redoes only that
image's per-item work, and a clean re-run gives byte-identical data outputs.

The full pipeline is built once per module (`built`); each later check reproduces only
the stages its claim is about. Every stage that loads a model spends ~15 s importing
transformers, so a full `dvc repro` per test made this file most of the suite's time.
Tests that need the whole pipeline up to date (registration, the LoRA experiment) come
before those that add an input and reproduce only its per-item stages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import loopback
import numpy as np
import pytest
import yaml
from PIL import Image

from semilens.io import read_json, read_jsonl
from semilens.vlm.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def sh(cmd: list[str], cwd: Path, stdout_only: bool = False) -> str:
    env = {
        **os.environ,
        # the stages run with this interpreter's environment, as `make run` arranges
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    env.pop("MLFLOW_TRACKING_URI", None)  # the registry goes to the repo's own sqlite store
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout if stdout_only else res.stdout + res.stderr


def dvc(*args: str, cwd: Path) -> str:
    return sh([sys.executable, "-m", "dvc", *args], cwd)


def particles(rng: np.random.Generator, path: Path) -> None:
    """A small bright-particles micrograph, as a user would drop into data/raw/images."""
    img = np.zeros((160, 160), np.uint8) + 40
    yy, xx = np.mgrid[:160, :160]
    for cy, cx in rng.integers(20, 140, (12, 2)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 210
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def pdf_page(path: Path, text: str) -> None:
    from reportlab.pdfgen.canvas import Canvas

    c = Canvas(str(path), invariant=1)
    c.drawString(72, 700, text)
    c.save()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A copy of the project (code + pipeline) as a fresh git repo with tiny params."""
    repo = tmp_path_factory.mktemp("repo")
    for name in ("dvc.yaml", "stages", "src", "knowledge", ".dvc/config", ".dvcignore", ".gitignore"):
        src = ROOT / name
        if not src.exists():
            continue
        dst = repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["synth_images"].update(n_per_class=2, size=128)
    params["prepare_vlm"]["pretrain"].update(steps=3, batch_size=2, eval_samples=2)
    params["finetune_vlm"]["trainer"].update(max_steps=2, batch_size=2, save_steps=2)
    params["synth_corpus"].update(n_docs=2, max_units_per_doc=3)
    params["synth_instructions"].update(n_math=16, n_math_drill=16)
    # the tiny from-scratch text model (trained in full), not the shipped SmolLM2 base
    params["prepare_llm"]["base"] = "tiny"
    params["prepare_llm"]["tiny"].update(vocab_size=512, hidden_size=32, intermediate_size=64, heads=2, kv_heads=1)
    params["pretrain_llm"].update(method="full", max_steps=3, batch_size=2, gradient_accumulation_steps=1)
    params["pretrain_llm"].update(block_size=32, heldout_fraction=0.3, save_steps=3)
    params["sft_llm"].update(max_steps=2, batch_size=2, gradient_accumulation_steps=1, max_length=128, save_steps=2)
    params["quantize_llm"].update(group_size=32, calibration_samples=4, max_seq_length=32)
    params["evaluate_llm"].update(max_rows=4, max_new_tokens=8, maths_max_new_tokens=8)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for raw in (repo / "data/raw/images", repo / "data/raw/pdfs"):
        raw.mkdir(parents=True)
        (raw / ".gitkeep").write_text("")
    # One raw image and one raw PDF beside the synthetic ones, so the audit tests trace
    # and verify real pipeline inputs too.
    particles(np.random.default_rng(3), repo / "data/raw/images/particles/raw_particles.png")
    pdf_page(
        repo / "data/raw/pdfs/raw_notes.pdf", "Wet oxidation of silicon at 1000 C grows SiO2 faster than dry oxidation."
    )
    sh(["git", "init", "-q"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "init"], repo)
    return repo


@pytest.fixture(scope="module")
def built(repo: Path) -> Path:
    """The repo after one full `dvc repro` from raw files: the state every test starts from."""
    dvc("repro", cwd=repo)
    return repo


def _outs(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        f"{stage}:{out['path']}": out["md5"]
        for stage, body in lock["stages"].items()
        for out in body.get("outs", [])
        # data outputs must be byte-identical; model weights are checked by their own tests
        if out["path"].startswith("data/")
    }


def test_repro_builds_everything_then_is_clean(built):
    repo = built
    params = yaml.safe_load((repo / "params.yaml").read_text())
    n_images = 2 * len(params["synth_images"]["classes"]) + 1  # and the raw one
    records = list(read_jsonl(repo / "data/interim/images/records.jsonl"))
    assert len(records) == n_images
    assert len(list(read_jsonl(repo / "data/interim/measurements/measurements.jsonl"))) == n_images
    assert (repo / "metrics/measure.json").is_file()
    sizes = read_json(repo / "metrics/split.json")
    assert sum(s["images"] for s in sizes.values()) > 0
    for split in ("train", "val", "test"):
        assert (repo / f"data/processed/vqa/{split}.parquet").is_file()
    families = list(params["prepare_vlm"]["bases"])
    assert families == list(FAMILIES)
    for family in families:
        assert (repo / f"models/{family}/base/model.safetensors").is_file()
        assert (repo / f"models/{family}/adapter/adapter_model.safetensors").is_file()
        report = read_json(repo / f"metrics/vlm/{family}.json")
        assert report["n_test_rows"] == sizes["test"]["rows"]
    compare = read_json(repo / "metrics/vlm/compare.json")
    assert compare["families"] == families and set(compare["margins"]) == set(families)
    # text path: PDFs -> pages -> Markdown -> tags -> instructions
    assert len(list(read_jsonl(repo / "data/interim/pages/pages.jsonl"))) >= 2
    assert read_json(repo / "metrics/clean.json")["similarity_min"] >= 0.97
    assert read_json(repo / "metrics/ontology.json")["chunks"] > 0
    assert read_json(repo / "metrics/instructions.json")["by_category"].keys() == {
        "concepts",
        "etch_math",
        "process_control",
    }
    llm = read_json(repo / "metrics/llm.json")
    assert {r["model"] for r in llm["rows"]} == {"base", "pretrained", "sft", "gptq"}
    assert read_json(repo / "metrics/quantize.json")["quantized_layers"] == 14
    out = dvc("repro", cwd=repo)
    assert "Running stage" not in out
    status = dvc("status", cwd=repo)
    assert "up to date" in status.lower() or not status.strip()


def test_the_report_of_the_run_renders_in_chromium(built):
    from browser import check_page, file_url

    page = built / "reports/index.html"
    check = check_page(file_url(page))
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "report-pipeline.png").write_bytes(check.screenshot)
    assert check.errors == []
    assert check.images and all(i["complete"] and i["width"] > 0 for i in check.images)
    for section in (
        "Vision-language models",
        "Test images",
        "Text model",
        "Ontology coverage",
        "Quarantine",
        "Measurement accuracy",
    ):
        assert section in check.text, section
    assert "raw_particles.png" in page.read_text() or "synth-" in page.read_text()


def _lock_md5(repo: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


def test_registered_version_carries_the_lock_hashes(built):
    from mlflow import MlflowClient

    repo = built
    uri = f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions("name = 'semilens-qwen2_5_vl'")
    assert versions, "register_models registered nothing"
    latest = max(versions, key=lambda v: int(v.version))
    tags = latest.tags
    expected = {
        "dataset": _lock_md5(repo, "split_dataset", "data/processed/vqa"),
        "base": _lock_md5(repo, "prepare_vlm@qwen2_5_vl", "models/qwen2_5_vl/base"),
        "adapter": _lock_md5(repo, "finetune_vlm@qwen2_5_vl", "models/qwen2_5_vl/adapter"),
    }
    for role, md5 in expected.items():
        assert tags[f"dvc.{role}.md5"] == md5, role
    head = sh(["git", "rev-parse", "HEAD"], repo).strip()
    assert tags["git.commit"] == head and len(tags["params_hash"]) == 16
    run = client.get_run(latest.run_id)
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} for d in run.inputs.dataset_inputs}
    assert inputs["vqa-train"]["mlflow.data.context"] == "training"
    assert inputs["vqa-train"]["dvc.dataset.md5"] == expected["dataset"]
    assert run.data.metrics["finetuned.vqa_accuracy"] >= 0
    # the cards: the family's (lineage + scores) and each checkpoint folder's (lineage)
    card = (repo / "models/qwen2_5_vl/README.md").read_text()
    assert all(md5 in card for md5 in expected.values()) and "vqa_accuracy" in card
    adapter_card = (repo / "models/qwen2_5_vl/adapter/README.md").read_text()
    assert expected["dataset"] in adapter_card and expected["base"] in adapter_card
    assert "generic accuracy" in (repo / "models/qwen2_5_vl/base/README.md").read_text()
    # registering again with nothing changed reuses the version
    n = len(versions)
    dvc("repro", "--force", "--single-item", "register_models@qwen2_5_vl", cwd=repo)
    assert len(client.search_model_versions("name = 'semilens-qwen2_5_vl'")) == n


def test_clean_rerun_is_byte_identical(built):
    repo = built
    # Only stages with data outputs are compared (model weights have their own tests), so
    # only they and what they depend on are re-run: the model stages' work is not repeated.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    data_stages = sorted(
        stage
        for stage, body in lock["stages"].items()
        if any(out["path"].startswith("data/") for out in body.get("outs", []))
    )
    dvc("repro", *data_stages, cwd=repo)  # a no-op in file order; makes this test stand alone
    before = _outs(repo)
    shutil.rmtree(repo / ".semilens_cache")
    # --force runs every command again (the targets and all they depend on);
    # --no-run-cache stops DVC restoring old outputs.
    out = dvc("repro", "--force", "--no-run-cache", *data_stages, cwd=repo)
    assert set(re.findall(r"Running stage '([^']+)'", out)) >= set(data_stages)
    assert _outs(repo) == before


def test_lora_variant_reruns_only_finetune_evaluate_register_compare_and_report(built):
    """Leaves the workspace on the variant; the tests after it reproduce only per-item stages."""
    repo = built
    dvc("repro", cwd=repo)  # a no-op in file order; makes this test stand alone
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "baseline"], repo)
    out = dvc("exp", "run", "-S", "finetune_vlm.lora.r=4", "-n", "rank4", cwd=repo)
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    # for every family, then the comparison and the report, which show every evaluation;
    # nothing upstream, nothing of the text path
    per_family = {f"{stage}@{f}" for stage in ("finetune_vlm", "evaluate_vlm", "register_models") for f in FAMILIES}
    assert ran == per_family | {"compare_vlm", "report"}, out
    shown = json.loads(sh([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo, stdout_only=True))
    ranks = {}
    for commit in shown:
        for exp in [commit, *[e for ex in commit.get("experiments") or [] for e in ex.get("revs", [])]]:
            data = exp.get("data") or {}
            params = data.get("params", {}).get("params.yaml", {}).get("data", {})
            if params:
                ranks[exp.get("name") or data.get("rev") or exp.get("rev")] = params["finetune_vlm"]["lora"]["r"]
    assert 4 in ranks.values() and len(set(ranks.values())) >= 2, ranks


def test_queued_variants_run_per_family_and_rank_beside_the_workspace(built):
    """`dvc exp run --queue` over families (stage targets) and LoRA ranks, then the queue
    run: each experiment trains and evaluates its own family in a temporary workspace, and
    the workspace (on the rank-4 variant the test above left) is untouched."""
    repo = built
    before = (repo / "params.yaml").read_text()
    grid = {"mllama": 2, "paligemma": 8}
    for family, rank in grid.items():
        out = dvc(
            "exp",
            "run",
            "--queue",
            "-S",
            f"finetune_vlm.lora.r={rank}",
            "-n",
            f"{family}-r{rank}",
            f"evaluate_vlm@{family}",
            cwd=repo,
        )
        assert "Queued experiment" in out, out
    dvc("exp", "run", "--run-all", cwd=repo)
    assert (repo / "params.yaml").read_text() == before
    shown = json.loads(sh([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo, stdout_only=True))
    found = {}
    for commit in shown:
        for exp in [e for ex in commit.get("experiments") or [] for e in ex.get("revs", [])]:
            data = exp.get("data") or {}
            if exp.get("name") in {f"{f}-r{r}" for f, r in grid.items()}:
                params = data["params"]["params.yaml"]["data"]
                metrics = data.get("metrics", {})
                found[exp["name"]] = (params["finetune_vlm"]["lora"]["r"], metrics, exp["rev"])
    assert set(found) == {f"{f}-r{r}" for f, r in grid.items()}, shown
    here = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]

    def adapter(stages: dict, family: str) -> str:
        return next(o["md5"] for o in stages[f"finetune_vlm@{family}"]["outs"] if o["path"].endswith("/adapter"))

    for family, rank in grid.items():
        r, metrics, rev = found[f"{family}-r{rank}"]
        assert r == rank
        assert "vqa_accuracy" in metrics[f"metrics/vlm/{family}.json"]["data"]["finetuned"]
        # the experiment trained its own family anew; the other family stayed as it was
        lock = yaml.safe_load(sh(["git", "show", f"{rev}:dvc.lock"], repo, stdout_only=True))["stages"]
        other = next(f for f in grid if f != family)
        assert adapter(lock, family) != adapter(here, family)
        assert adapter(lock, other) == adapter(here, other)


def semilens_cli(*args: str, cwd: Path, tracking_uri: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "200"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return subprocess.run(
        [sys.executable, "-m", "semilens.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def _trace(repo: Path, artifact: str, tracking_uri: str | None = None) -> dict:
    res = semilens_cli("trace", artifact, "--json", cwd=repo, tracking_uri=tracking_uri)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


# The audit tests run on the workspace the LoRA variant left: its stages' lock entries are
# not committed, the rest are in the "baseline" commit, and the registry has both versions.


def test_trace_reaches_every_raw_file_behind_the_registered_models(built):
    import pandas as pd

    from semilens.io import sha256_file

    repo = built
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    head = sh(["git", "rev-parse", "HEAD"], repo).strip()

    vlm = _trace(repo, "models:/semilens-qwen2_5_vl/latest")
    assert vlm["kind"] == "model" and vlm["roots"] == ["register_models@qwen2_5_vl"] and not vlm["warnings"]
    assert vlm["model"]["artifacts"]["adapter"]["md5"] == _lock_md5(
        repo, "finetune_vlm@qwen2_5_vl", "models/qwen2_5_vl/adapter"
    )
    # every stage upstream, each dependency's md5 as dvc.lock has it, params and commit
    assert set(vlm["stages"]) == {
        "register_models@qwen2_5_vl",
        "evaluate_vlm@qwen2_5_vl",
        "finetune_vlm@qwen2_5_vl",
        "prepare_vlm@qwen2_5_vl",
        "split_dataset",
        "annotate_images",
        "measure_images",
        "ingest_images",
        "synth_images",
    }
    for name, stage in vlm["stages"].items():
        assert stage["cmd"] == lock[name]["cmd"] and stage["params"] == lock[name].get("params", {})
        assert {d["path"]: d["md5"] for d in stage["deps"]} == {d["path"]: d["md5"] for d in lock[name]["deps"]}
    assert vlm["stages"]["finetune_vlm@qwen2_5_vl"]["params"]["params.yaml"]["finetune_vlm"]["lora"]["r"] == 4
    assert vlm["stages"]["finetune_vlm@qwen2_5_vl"]["commit"] is None  # the variant: not committed
    assert vlm["stages"]["split_dataset"]["commit"] == head
    assert {i["path"] for i in vlm["inputs"]} == {"data/raw/images"}
    # the raw files: exactly the dataset's records, with their splits and hashes
    frames = {s: pd.read_parquet(repo / f"data/processed/vqa/{s}.parquet") for s in ("train", "val", "test")}
    expected = {(r.source, r.sha256, int(r.page)) for df in frames.values() for r in df.itertuples()}
    images = vlm["records"]["images"]
    assert {(i["source"], i["sha256"], i["page"]) for i in images} == expected
    train = {r.source for r in frames["train"].itertuples()}
    assert {i["source"] for i in images if "train" in i["splits"]} == train
    assert all(i["status"] == "ok" and sha256_file(repo / i["source"]) == i["sha256"] for i in images)
    raw = [i for i in images if i["origin"] == "input"]
    assert [i["source"] for i in raw] == ["data/raw/images/particles/raw_particles.png"]
    assert all(i["origin"] == "synth_images" for i in images if i not in raw)

    llm = _trace(repo, "models:/semilens-llm/latest")
    assert llm["roots"] == ["register_llm"] and "synth_corpus" in llm["stages"] and "extract_pdfs" in llm["stages"]
    chunks = list(read_jsonl(repo / "data/interim/markdown/chunks.jsonl"))
    want: dict[str, set[int]] = {}
    for c in chunks:  # pretraining read every chunk; the instructions cite a subset
        want.setdefault(c["source"], set()).update(c["pages"])
    assert {p["source"]: set(p["pages"]) for p in llm["records"]["pdfs"]} == want
    assert "data/raw/pdfs/raw_notes.pdf" in want
    sources = set(
        pd.concat([pd.read_parquet(p) for p in (repo / "data/processed/instructions").glob("*.parquet")])["source"]
    )
    assert set(llm["records"]["generated"]) == {s for s in sources if s.startswith("generator:")}
    assert llm["records"]["knowledge"] and all(k.startswith("knowledge/") for k in llm["records"]["knowledge"])

    # one split of the dataset: exactly its images
    split = _trace(repo, "data/processed/vqa/test.parquet")
    assert {(i["source"], i["sha256"]) for i in split["records"]["images"]} == {
        (r.source, r.sha256) for r in frames["test"].itertuples()
    }
    # a path resolves to the stage that wrote it; the tree form prints; bad names say why
    part = _trace(repo, "models/qwen2_5_vl/adapter/adapter_config.json")
    assert part["roots"] == ["finetune_vlm@qwen2_5_vl"] and "register_models@qwen2_5_vl" not in part["stages"]
    tree = semilens_cli("trace", "split_dataset", cwd=repo)
    assert tree.returncode == 0 and "raw_particles.png" in tree.stdout and "ingest_images" in tree.stdout
    for bad in ("no_such_stage", "models:/semilens-nothing/1"):
        res = semilens_cli("trace", bad, cwd=repo)
        assert res.returncode == 2 and "error" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_verify_names_an_edited_raw_image_and_everything_downstream(built):
    repo = built
    ok = semilens_cli("verify", cwd=repo)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    image = repo / "data/raw/images/particles/raw_particles.png"
    original = image.read_bytes()
    edited = bytearray(original)
    edited[-20] ^= 0xFF  # one byte of the pixel data
    image.write_bytes(bytes(edited))
    try:
        res = semilens_cli("verify", "--json", cwd=repo)
        assert res.returncode == 1, res.stdout + res.stderr
        report = json.loads(res.stdout)
        kinds = {(f["kind"], f["path"]) for f in report["findings"]}
        assert ("changed-file", "data/raw/images/particles/raw_particles.png") in kinds
        assert ("changed-input", "data/raw/images") in kinds
        stale = report["stale_stages"]
        # the data stages in pipeline order, then every family's model stages (the bases
        # do not read the data), the comparison and the report
        assert stale[:4] == ["ingest_images", "measure_images", "annotate_images", "split_dataset"]
        assert set(stale[4:]) == {
            f"{stage}@{f}" for stage in ("finetune_vlm", "evaluate_vlm", "register_models") for f in FAMILIES
        } | {"compare_vlm", "report"}
        assert sorted(m["name"] for m in report["affected_models"]) == sorted(f"semilens-{f}" for f in FAMILIES)
        text = semilens_cli("verify", cwd=repo).stdout
        assert "raw_particles.png" in text and "models:/semilens-qwen2_5_vl/" in text
    finally:
        image.write_bytes(original)
    # an edited model file is named inside its folder (DVC's cached listing of the output)
    weights = repo / "models/qwen2_5_vl/adapter/adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        report = json.loads(semilens_cli("verify", "--json", cwd=repo).stdout)
        drift = [f for f in report["findings"] if f["kind"] == "drifted-output"]
        assert [f["path"] for f in drift] == ["models/qwen2_5_vl/adapter"]
        assert "adapter_model.safetensors" in drift[0]["detail"]
        assert report["stale_stages"] == ["register_models@qwen2_5_vl"]  # evaluation reads merged/, not the adapter
        assert [m["name"] for m in report["affected_models"]] == ["semilens-qwen2_5_vl"]
    finally:
        weights.write_bytes(original)
    assert semilens_cli("verify", cwd=repo).returncode == 0


def test_vlm_annotation_through_semilens_serve_runs_end_to_end_and_leaves_no_key(built, monkeypatch):
    """`annotate_images: backend: vlm` pointed at `semilens serve` of the fine-tuned VLM:
    `dvc repro` annotates through the server and carries the result downstream. With an
    API key planted in the environment (and required by the server), no file anywhere in
    the project holds it afterwards: params, dvc.lock, logs, metrics, caches, MLflow."""
    from pydantic import SecretStr

    from semilens.serve import ServeOptions, make_app, serve_in_background

    repo = built
    dvc("repro", cwd=repo)  # a no-op in file order; makes this test stand alone
    vqa_before = _lock_md5(repo, "split_dataset", "data/processed/vqa")
    planted = "sk-semilens-planted-93e1c0"
    monkeypatch.setenv("OPENAI_API_KEY", planted)
    original = (repo / "params.yaml").read_text()
    app = make_app(repo / "models/qwen2_5_vl/merged", ServeOptions(api_key=SecretStr(planted)))
    with serve_in_background(app) as url:
        params = yaml.safe_load(original)
        params["annotate_images"].update(backend="vlm")
        params["annotate_images"]["vlm"].update(base_url=url, model=app.state.model_name, max_tokens=24, max_reasks=1)
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        out = dvc("repro", cwd=repo)
    try:
        ran = set(re.findall(r"Running stage '([^']+)'", out))
        assert {"annotate_images", "split_dataset"} <= ran, out
        # The tiny model writes no usable JSON, so every pair falls back to the templates:
        # the dataset is byte-identical and nothing after it is retrained for nothing.
        assert _lock_md5(repo, "split_dataset", "data/processed/vqa") == vqa_before
        assert not ran & {"finetune_vlm@qwen2_5_vl", "evaluate_vlm@qwen2_5_vl"}, out
        assert "up to date" in dvc("status", cwd=repo).lower()
        report = read_json(repo / "metrics/annotate.json")
        n_images = report["n_images"]
        assert report["backend"] == "vlm" and report["model"] == app.state.model_name
        acc = report["requests"]
        # one request per image plus its re-ask (the tiny model does not write the JSON)
        assert acc["items"] == n_images and acc["requests_sent"] == acc["items"] * 2 and acc["failed"] == n_images
        assert report["counts"].get("image_failed_invalid_output") == n_images
        rows = list(read_jsonl(repo / "data/processed/annotations/annotations.jsonl"))
        assert len(rows) == n_images and all(q["written_by"] in ("vlm", "grounded") for r in rows for q in r["qa"])
        leaks = [p for p in repo.rglob("*") if p.is_file() and planted.encode() in p.read_bytes()]
        assert not leaks, leaks
        assert (repo / "mlruns/mlflow.db").is_file() and (repo / "logs/annotate_images.json").is_file()
    finally:
        (repo / "params.yaml").write_text(original)


# The two tests below reproduce up to the last per-item stage of their path only: what
# they check is that stage's cache log, and the stages after it (split, training,
# evaluation) re-run on any new input by design.


def test_adding_one_image_redoes_only_that_image(built):
    repo = built
    particles(np.random.default_rng(7), repo / "data/raw/images/particles/new_particles.png")
    out = dvc("repro", "annotate_images", cwd=repo)
    assert "Running stage 'synth_images'" not in out
    for stage in ("ingest_images", "measure_images", "annotate_images"):
        assert f"Running stage '{stage}'" in out, out
        log = read_json(repo / "logs" / f"{stage}.json")
        assert log["cache"]["misses"] == 1, (stage, log)
        assert log["cache"]["hits"] >= 1, (stage, log)
    records = list(read_jsonl(repo / "data/interim/images/records.jsonl"))
    assert any(r["source"].endswith("new_particles.png") and r["label"] == "particles" for r in records)


def test_adding_one_pdf_redoes_only_that_pdf(built):
    repo = built
    docs = read_json(repo / "logs/synth_corpus.json")["documents"] + 1  # and the raw one
    pdf_page(repo / "data/raw/pdfs/notes.pdf", "Reactive ion etching of SiO2 in CHF3 gives a vertical profile.")
    out = dvc("repro", "clean_markdown", cwd=repo)
    assert "Running stage 'synth_corpus'" not in out and "Running stage 'extract_pdfs'" in out
    for stage in ("extract_pdfs", "clean_markdown"):
        assert read_json(repo / "logs" / f"{stage}.json")["cache"] == {"hits": docs, "misses": 1}, stage
    pages = list(read_jsonl(repo / "data/interim/pages/pages.jsonl"))
    assert any(p["source"] == "data/raw/pdfs/notes.pdf" and "CHF3" in p["text"] for p in pages)


def test_every_model_registers_on_a_team_mlflow_server_and_traces_to_its_raw_files(built, tmp_path_factory):
    # Last in this file: it re-runs the registration stages, against a server this time.
    from mlflow import MlflowClient

    repo = built
    with loopback.mlflow_server(tmp_path_factory.mktemp("team-mlflow")) as (uri, artifacts):
        for stage in [f"register_models@{f}" for f in FAMILIES] + ["register_llm"]:
            res = semilens_cli("run", stage, cwd=repo, tracking_uri=uri)
            assert res.returncode == 0, res.stderr[-3000:]
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        names = {m.name for m in client.search_registered_models()}
        assert names == {f"semilens-{f}" for f in FAMILIES} | {"semilens-llm", "semilens-llm_gptq"}
        assert any(artifacts.rglob("adapter_config.json"))  # the copies live on the server
        vlm = _trace(repo, "models:/semilens-qwen2_5_vl/latest", tracking_uri=uri)
        assert vlm["roots"] == ["register_models@qwen2_5_vl"] and not vlm["warnings"]
        raw = [i["source"] for i in vlm["records"]["images"] if i["origin"] == "input"]
        assert "data/raw/images/particles/raw_particles.png" in raw
        llm = _trace(repo, "models:/semilens-llm/latest", tracking_uri=uri)
        assert "data/raw/pdfs/raw_notes.pdf" in {p["source"] for p in llm["records"]["pdfs"]}
