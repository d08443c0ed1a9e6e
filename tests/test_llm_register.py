"""register_llm and `semilens ask` on tiny real checkpoints in a real git + DVC repository.

The text stages run for real on hand-written inputs (a dozen corpus chunks, a few
instruction pairs) for one or two steps each; `dvc commit` then records their outputs in
dvc.lock exactly as `dvc repro` would, so registration goes through the real lock check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import text_config

from semilens.config import Config
from semilens.io import write_jsonl
from semilens.lineage import LineageError, file_md5
from semilens.llm.ask import ask
from semilens.llm.evaluate import MODELS, answer_llm, evaluate_llm
from semilens.llm.prepare import prepare_llm
from semilens.llm.pretrain import pretrain_llm
from semilens.llm.quantize import quantize_llm
from semilens.llm.register import lineage_paths, register_llm, text_metrics
from semilens.llm.sft import sft_llm

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "semilens-"

# Each stage's outputs, as the project's dvc.yaml names them (stage names too, so the
# `dvc.<role>.stage` tags read as in a real run).
STAGE_OUTS = {
    "synth_instructions": ["instructions"],
    "clean_markdown": ["markdown"],
    "prepare_llm": ["models/llm/base"],
    "pretrain_llm": ["models/llm/pretrained"],
    "sft_llm": ["models/llm/adapter", "models/llm/sft"],
    "quantize_llm": ["models/llm/gptq"],
    **{f"answer_llm_{m}": [f"models/llm/answers/{m}.json"] for m in ("base", "pretrained", "sft", "gptq")},
    "evaluate_llm": ["models/llm/eval"],
}
ROLE_PATHS = {
    "dataset": "instructions",
    "corpus": "markdown",
    "base": "models/llm/base",
    "pretrained": "models/llm/pretrained",
    "adapter": "models/llm/adapter",
    "sft": "models/llm/sft",
    "gptq": "models/llm/gptq",
    **{f"answers_{m}": f"models/llm/answers/{m}.json" for m in ("base", "pretrained", "sft", "gptq")},
    "evaluation": "models/llm/eval",
}

TOPICS = [
    "Reactive ion etching of silicon dioxide in CHF3 gives a vertical profile because polymer protects the sidewalls.",
    "The etch rate rises with RF power until the reactant supply limits it; pressure trades ion energy for density.",
    "Chemical mechanical polishing removes overburden copper; dishing grows on wide lines and erosion on dense arrays.",
    "Atomic layer deposition grows one monolayer per cycle through self-limiting surface reactions at low temperature.",
    "Photoresist thickness swings with the standing wave; a bottom anti-reflective coating damps the reflectivity.",
    "Ion implantation sets the dose by integrated beam current; channeling is avoided by tilting the wafer seven degrees.",
    "Thermal oxidation follows the Deal-Grove model: linear at first, then parabolic once diffusion through oxide limits.",
    "Wet etching in buffered hydrofluoric acid removes oxide isotropically and stops on silicon with high selectivity.",
    "Sputter deposition of titanium nitride forms a barrier; collimation improves the bottom coverage of deep vias.",
    "Endpoint detection watches an optical emission line fall when the film clears, and overetch removes the residues.",
    "Loading effects slow the etch when much exposed area consumes the radicals; microloading depends on local density.",
    "Rapid thermal anneal activates dopants in seconds and limits diffusion; slip appears if the wafer heats unevenly.",
]
PAIRS = [
    (
        "What sets the sidewall profile in oxide RIE?",
        "Polymer from CHF3 protects the sidewalls, so the profile is vertical.",
        "concepts",
        "easy",
    ),
    (
        "How does RF power change the etch rate?",
        "It raises the rate until the reactant supply limits it.",
        "concepts",
        "medium",
    ),
    ("What is dishing in CMP?", "Copper recess on wide lines after overpolish.", "concepts", "easy"),
    ("Why is ALD conformal?", "Each cycle is self-limiting, so every surface gets one monolayer.", "concepts", "hard"),
    (
        "What does a BARC do?",
        "It damps reflectivity and the standing-wave swing of resist thickness.",
        "process_control",
        "medium",
    ),
    ("Why tilt the wafer in implantation?", "Tilting by seven degrees avoids channeling.", "process_control", "hard"),
    ("Film 975 nm etched in 2.5 min: rate?", "ER = 975 nm / 2.5 min = 390 nm/min.", "etch_math", "easy"),
    ("What limits thick oxide growth?", "Diffusion through the oxide: the parabolic regime.", "concepts", "medium"),
]


def _sh(cmd: list[str], cwd: Path) -> str:
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _write_inputs(cfg: Config) -> None:
    """Corpus chunks and instruction splits in the schemas clean_markdown and synth_instructions write."""
    chunks = [
        {"chunk_id": f"notes:{i:04d}", "doc_id": "notes", "text": f"# Note {i}\n\n{t} {t}"}
        for i, t in enumerate(TOPICS)
    ]
    write_jsonl(Path(cfg.paths.markdown) / "chunks.jsonl", chunks)
    rows = [
        {
            "id": f"p{i}",
            "category": c,
            "kind": c,
            "difficulty": d,
            "instruction": q,
            "response": a,
            "source": "test",
            "group_key": f"g{i}",
            "answer": json.dumps({"value": 390.0, "unit": "nm/min"}) if c == "etch_math" else "",
        }
        for i, (q, a, c, d) in enumerate(PAIRS)
    ]
    out = Path(cfg.paths.instructions)
    out.mkdir(parents=True)
    for split, part in {
        "train": rows,
        "val": rows[:1],
        "test": rows[:1],
        "benchmark": [rows[0], rows[1], rows[3], rows[6]],
    }.items():
        pd.DataFrame([{**r, "split": split} for r in part]).to_parquet(out / f"{split}.parquet")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, Config]:
    """A git + DVC repo holding tiny real text checkpoints, committed to dvc.lock."""
    repo = tmp_path_factory.mktemp("llmrepo")
    cfg = text_config(
        repo,
        prepare_llm={
            "tiny": {"vocab_size": 400, "hidden_size": 32, "intermediate_size": 64, "heads": 2, "kv_heads": 1}
        },
        pretrain_llm={
            "max_steps": 2,
            "batch_size": 2,
            "block_size": 32,
            "heldout_fraction": 0.3,
            "save_steps": 2,
            "warmup_steps": 0,
        },
        # a large learning rate, so the adapter moves the answers away from pretrained's:
        # otherwise an adapter that silently failed to load would answer the same as sft
        sft_llm={
            "max_steps": 3,
            "batch_size": 4,
            "max_length": 64,
            "save_steps": 3,
            "warmup_steps": 0,
            "learning_rate": 0.05,
        },
        quantize_llm={"group_size": 32, "calibration_samples": 2, "max_seq_length": 32},
        evaluate_llm={"max_new_tokens": 4, "maths_max_new_tokens": 4, "batch_size": 4},
    )
    cfg = cfg.model_copy(update={"paths": cfg.paths.model_copy(update={"mlflow": repo / "mlruns"})})
    _write_inputs(cfg)
    prepare_llm(cfg)
    pretrain_llm(cfg)
    sft_llm(cfg)
    quantize_llm(cfg)
    for name in MODELS:
        answer_llm(cfg, name)
    evaluate_llm(cfg)
    (repo / ".gitignore").write_text("cache/\nlogs/\nmlruns/\nmetrics/\n")
    (repo / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {s: {"cmd": "true", "outs": o} for s, o in STAGE_OUTS.items()}})
    )
    _sh(["git", "init", "-q"], repo)
    _sh([sys.executable, "-m", "dvc", "init", "-q"], repo)
    _sh([sys.executable, "-m", "dvc", "commit", "-f", "-q"], repo)
    _sh(["git", "add", "-A"], repo)
    _sh(["git", "commit", "-qm", "text model"], repo)
    return repo, cfg


@pytest.fixture
def in_repo(repo, monkeypatch):
    """Run from the repo root (dvc.lock and git are read from the working directory), with
    the registry in the repo's own sqlite store."""
    monkeypatch.chdir(repo[0])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return repo


def _lock_md5(repo: Path) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for body in lock["stages"].values() for o in body["outs"]}


def _client(repo: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _versions(repo: Path, name: str) -> list:
    return _client(repo).search_model_versions(f"name = '{name}'")


@pytest.mark.e2e
def test_registered_versions_carry_the_lock_hashes(in_repo):
    repo, cfg = in_repo
    done = register_llm(cfg)
    assert not done["sft_reused"] and not done["gptq_reused"]
    locked = _lock_md5(repo)
    head = _sh(["git", "rev-parse", "HEAD"], repo).strip()
    client = _client(repo)
    for kind, name, artifact in (("sft", f"{PREFIX}llm", "adapter"), ("gptq", f"{PREFIX}llm_gptq", "gptq")):
        (mv,) = _versions(repo, name)
        for role, path in ROLE_PATHS.items():
            assert mv.tags[f"dvc.{role}.md5"] == locked[path], (name, role)
            assert mv.tags[f"dvc.{role}.path"] == path
        assert mv.tags["dvc.gptq.stage"] == "quantize_llm" and mv.tags["dvc.dataset.stage"] == "synth_instructions"
        assert mv.tags["git.commit"] == head and mv.tags["model"] == kind and len(mv.tags["params_hash"]) == 16
        assert mv.source.endswith(f"/{artifact}") and mv.run_id == done[f"{kind}_run_id"]
        logged = {Path(f.path).name for f in client.list_artifacts(mv.run_id, artifact)}
        assert ("adapter_config.json" if kind == "sft" else "config.json") in logged
        run = client.get_run(mv.run_id)
        assert run.data.params["sft_llm.lora.r"] == "16" and run.data.params["quantize_llm.group_size"] == "32"
        for key in (
            "sft.all.rouge_l",
            "gptq.all.heldout_perplexity",
            "base.easy.bertscore_f1",
            "quantize.linear_size_ratio",
            "train.sft.steps",
            "train.pretrain.heldout_perplexity_after",
        ):
            assert key in run.data.metrics, key
        inputs = {
            d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags}) for d in run.inputs.dataset_inputs
        }
        digest, tags = inputs["instructions-train"]
        assert digest == file_md5(repo / "instructions" / "train.parquet")
        assert tags["mlflow.data.context"] == "training" and tags["dvc.dataset.md5"] == locked["instructions"]
        assert inputs["instructions-benchmark"][1]["mlflow.data.context"] == "evaluation"
    assert _versions(repo, f"{PREFIX}llm_gptq")[0].tags["quantization"] == "gptq w4a16 group 32"


@pytest.mark.e2e
def test_the_card_has_the_lineage_and_scores_and_no_run_ids(in_repo):
    repo, cfg = in_repo
    first = register_llm(cfg)  # reuses the versions registered above, or registers them
    card = (repo / "models/llm/README.md").read_text()
    assert all(md5 in card for md5 in _lock_md5(repo).values())  # every upstream artifact, by dvc.lock md5
    for row in ("| sft | all |", "| gptq | hard |", "| base | easy |"):
        assert row in card
    assert "linear_size_ratio" in card and "Not scored: no judge was configured." in card
    assert first["sft_run_id"] not in card and first["gptq_run_id"] not in card
    # registering again with nothing changed: the same versions and a byte-identical card
    again = register_llm(cfg)
    assert again["sft_reused"] and again["gptq_reused"]
    assert again["sft_version"] == first["sft_version"] and again["gptq_version"] == first["gptq_version"]
    assert (repo / "models/llm/README.md").read_text() == card
    assert len(_versions(repo, f"{PREFIX}llm")) == len(_versions(repo, f"{PREFIX}llm_gptq")) == 1


@pytest.mark.e2e
def test_weights_that_differ_from_dvc_lock_are_refused(in_repo):
    repo, cfg = in_repo
    weights = repo / "models/llm/gptq/model.safetensors"
    original = weights.read_bytes()
    before = len(_versions(repo, f"{PREFIX}llm_gptq"))
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit flipped
        with pytest.raises(LineageError, match=r"models/llm/gptq \(gptq\) has md5 \w+\.dir but dvc\.lock says"):
            register_llm(cfg)
    finally:
        weights.write_bytes(original)
    assert len(_versions(repo, f"{PREFIX}llm_gptq")) == before


def test_metrics_are_flattened_per_model_difficulty_and_judge():
    report = {
        "rows": [
            {
                "model": "sft",
                "difficulty": "all",
                "math_exact": None,
                "rouge_l": 0.25,
                "bertscore_f1": 0.5,
                "heldout_perplexity": 20.0,
                "n": 4,
            }
        ],
        "judge": {
            "configured": True,
            "scores": [{"model": "gptq", "difficulty": "hard", "clarity": 3.5, "specificity": None, "n_judged": 2}],
        },
    }
    quantize = {
        "bits": 4,
        "linear_size_ratio": 0.16,
        "format": "pack-quantized",
        "reloads_and_generates": True,
        "sample": {"answer": "x"},
    }
    got = text_metrics(report, quantize, {"sft": {"steps": 3, "resumed_from": None}})
    assert got == {
        "sft.all.rouge_l": 0.25,
        "sft.all.bertscore_f1": 0.5,
        "sft.all.heldout_perplexity": 20.0,
        "judge.gptq.hard.clarity": 3.5,
        "quantize.bits": 4,
        "quantize.linear_size_ratio": 0.16,
        "train.sft.steps": 3,
    }


def test_the_dvc_stage_depends_on_every_artifact_it_tags():
    """A tagged artifact missing from the stage's deps would not re-run registration when it changes."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["register_llm"]

    def resolve(entry: str) -> str:
        for key, value in params["paths"].items():
            entry = entry.replace(f"${{paths.{key}}}", str(value))
        return entry

    deps = {resolve(d) for d in stage["deps"]}
    cfg = Config.model_validate({"paths": params["paths"]})
    assert {p.as_posix() for p in lineage_paths(cfg).values()} <= deps
    assert {"metrics/llm.json", "metrics/quantize.json", "src/semilens/llm/register.py"} <= deps
    assert [resolve(o) for o in stage["outs"]] == ["models/llm/README.md"]
    assert {"register_models", "sft_llm", "quantize_llm"} <= set(stage["params"])


def _ask(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # On the CPU (fp32) a merged LoRA answers exactly as the unmerged one; in bf16 on a GPU
    # rounding may part them, so this comparison is pinned to the CPU.
    return subprocess.run(
        [sys.executable, "-m", "semilens.cli", "ask", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80", "CUDA_VISIBLE_DEVICES": ""},
    )


@pytest.mark.e2e
def test_ask_answers_alike_with_the_merged_and_the_adapter_folder(repo):
    root, cfg = repo
    models = Path(cfg.paths.models) / "llm"
    question = "What sets the sidewall profile in oxide RIE?"
    answers = {}
    for kind in ("sft", "adapter"):
        res = _ask(question, "--checkpoint", str(models / kind), "--max-new-tokens", "12", cwd=root)
        assert res.returncode == 0, res.stderr
        answers[kind] = res.stdout.strip()
    assert answers["sft"] and answers["sft"] == answers["adapter"]  # the same weights, merged or not
    # the library function the command calls, on the other folders
    assert ask(models / "pretrained", question, 12) != answers["adapter"]  # so the adapter was really applied
    assert ask(models / "gptq", question, 12)


@pytest.mark.e2e
def test_ask_with_the_calculator_decodes_as_the_benchmark_does(repo):
    from transformers import AutoTokenizer

    from semilens.llm.calculator import generate_with_calculator
    from semilens.llm.evaluate import chat_prompt
    from semilens.llm.pretrain import load_causal

    root, cfg = repo
    sft = Path(cfg.paths.models) / "llm" / "sft"
    question = "A 500 nm film clears in 2 min. What is the etch rate?"
    res = _ask(question, "--checkpoint", str(sft), "--max-new-tokens", "12", "--calculator", cwd=root)
    assert res.returncode == 0, res.stderr
    tok = AutoTokenizer.from_pretrained(sft)
    expected = generate_with_calculator(load_causal(sft), tok, chat_prompt(tok, question), 12)
    assert res.stdout.strip() == expected


@pytest.mark.e2e
def test_ask_fails_cleanly_on_bad_input(repo, tmp_path):
    root, cfg = repo
    not_causal = tmp_path / "vit"
    not_causal.mkdir()
    (not_causal / "config.json").write_text(json.dumps({"model_type": "vit"}))
    for folder, reason in (
        (tmp_path / "missing", "no such folder"),
        (not_causal, "model_type 'vit' is not a causal language model"),
    ):
        res = _ask("What is CMP?", "--checkpoint", str(folder), cwd=root)
        assert res.returncode == 2, (folder, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr and reason in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    # the command turns these ValueError/OSError cases into the same one-line exit
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        ask(Path(cfg.paths.models) / "llm" / "eval", "What is CMP?")
    with pytest.raises(ValueError, match="the question is empty"):
        ask(Path(cfg.paths.models) / "llm" / "sft", "   ")
