"""Text path, data side: ontology tagging and the instruction dataset.

Every etching-maths answer is recomputed here by code that shares nothing with the
generator (closed forms written out again, the ARDE time by numerical integration).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import KNOWLEDGE, text_config

from semilens.config import SynthInstructionsConfig, TagOntologyConfig
from semilens.io import read_json, read_jsonl
from semilens.text.clean import clean_markdown
from semilens.text.corpus import synth_corpus
from semilens.text.etch_math import GENERATORS, problems
from semilens.text.extract import extract_pdfs
from semilens.text.instruct import SPLITS, assign_split, build_pairs, is_drill, synth_instructions
from semilens.text.knowledge import load_knowledge
from semilens.text.tag import coverage, tag_chunk, tag_ontology, unit_patterns, unit_text

# ---------------------------------------------------------------- etching maths


def _recompute(kind: str, x: dict) -> float:
    if kind == "etch_rate":
        return (x["before_nm"] - x["after_nm"]) * 60.0 / x["time_s"]
    if kind == "selectivity":
        return x["er_film"] / x["er_mask"]
    if kind == "anisotropy":
        return 1.0 - (x["undercut_nm"] / x["time_s"]) / (x["depth_nm"] / x["time_s"])
    if kind == "uniformity":
        s = sorted(x["sites"])
        return 100.0 * (s[-1] - s[0]) / (2.0 * (math.fsum(s) / len(s)))
    if kind == "endpoint":
        return 60.0 * x["thickness_nm"] / x["er_nm_min"] * (100 + x["overetch_pct"]) / 100.0
    if kind == "overetch_loss":
        clear_min = x["thickness_nm"] / x["er_nm_min"]
        return clear_min * x["overetch_pct"] / 100.0 * (x["er_nm_min"] / x["selectivity"])
    if kind == "arde":
        from scipy.integrate import quad

        rate = lambda h: x["er0_nm_min"] * (1.0 - x["k"] * h / x["width_nm"])  # noqa: E731
        return quad(lambda h: 1.0 / rate(h), 0.0, x["depth_nm"])[0]
    if kind == "loading":
        r1 = x["er0_nm_min"] / (1.0 + x["phi"] * x["area_1"])
        r2 = x["er0_nm_min"] / (1.0 + x["phi"] * x["area_2"])
        return 100.0 * (r1 - r2) / r1
    raise AssertionError(kind)


def test_every_etching_answer_is_recomputed_independently():
    probs = problems(800, seed=3)
    assert {p.kind for p in probs} == set(GENERATORS)
    assert {p.difficulty for p in probs} == {"easy", "medium", "hard"}
    for p in probs:
        expected = _recompute(p.kind, p.inputs)
        # answers are quoted to 3 significant figures
        assert p.answer == pytest.approx(expected, rel=6e-3), (p.kind, p.inputs, p.answer, expected)
        assert f"{p.answer:g}" in p.response, p.response  # the response states the answer


def test_a_wrong_generator_would_be_caught():
    p = problems(1, seed=0)[0]
    assert p.kind == "etch_rate"
    # forgetting the seconds -> minutes conversion is exactly the mistake the check exists for
    wrong = (p.inputs["before_nm"] - p.inputs["after_nm"]) / p.inputs["time_s"]
    assert wrong != pytest.approx(_recompute(p.kind, p.inputs), rel=6e-3)


# ---------------------------------------------------------------- tagging


@pytest.fixture(scope="module")
def kb():
    return load_knowledge(KNOWLEDGE)


def test_each_unit_description_is_tagged_with_its_own_unit(kb):
    """The tagger's recall on text whose answer is known: every unit's own description."""
    from semilens.minilm import embed

    refs = list(kb.units())
    patterns = [unit_patterns(r) for r in refs]
    unit_vectors = embed([unit_text(r) for r in refs])
    texts = [f"{r.unit.description} Typical problem: {r.unit.defects[0].symptom}" for r in refs]
    vectors = embed(texts)
    cfg = TagOntologyConfig()
    top1 = top3 = 0
    for r, text, vec in zip(refs, texts, vectors):
        tags = [t["unit"] for t in tag_chunk(text, vec, refs, patterns, unit_vectors, cfg)]
        top1 += bool(tags) and tags[0] == r.unit.id
        top3 += r.unit.id in tags
    assert top3 / len(refs) >= 0.9 and top1 / len(refs) >= 0.7, (top1, top3, len(refs))


def test_short_capital_aliases_match_only_as_words(kb):
    ald = next(r for r in kb.units() if "ALD" in r.unit.aliases)
    pats = dict(unit_patterns(ald))
    assert pats["ALD"].search("films grown by ALD at 250 °C")
    assert not pats["ALD"].search("the ald-based emerald route")


def test_coverage_names_what_the_corpus_misses(kb):
    refs = list(kb.units())
    tags = [{"units": [{"unit": refs[0].unit.id}]}, {"units": [{"unit": refs[0].unit.id}, {"unit": refs[-1].unit.id}]}]
    cov = coverage(kb, tags)
    assert cov["units_covered"] == 2 and cov["groups_covered"] == 2
    assert cov["groups"][refs[0].group.id]["modules"][refs[0].module.id]["units"][refs[0].unit.id] == 2
    assert refs[1].unit.id in cov["units_missed"] and refs[0].unit.id not in cov["units_missed"]
    assert len(cov["groups_missed"]) == 8


# ---------------------------------------------------------------- stages end to end


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text")
    cfg = text_config(tmp, synth_corpus={"n_docs": 3, "max_units_per_doc": 5}, synth_instructions={"n_math": 80})
    synth_corpus(cfg)
    extract_pdfs(cfg)
    clean_markdown(cfg)
    tagged = tag_ontology(cfg)
    made = synth_instructions(cfg)
    return cfg, tagged, made


@pytest.mark.e2e
def test_tag_ontology_writes_tags_and_a_coverage_report(text_run):
    cfg, tagged, _ = text_run
    tags = list(read_jsonl(Path(cfg.paths.tags) / "tags.jsonl"))
    chunks = {c["chunk_id"]: c for c in read_jsonl(Path(cfg.paths.markdown) / "chunks.jsonl")}
    assert [t["chunk_id"] for t in tags] == list(chunks)
    tagged_share = sum(bool(t["units"]) for t in tags) / len(tags)
    assert tagged_share >= 0.9
    # three documents, one group each: their groups are covered, the rest reported missing
    metrics = read_json(Path(cfg.paths.metrics) / "ontology.json")
    assert metrics["groups_covered"] >= 3 and len(metrics["groups_missed"]) <= 7
    assert metrics["units_covered"] + len(metrics["units_missed"]) == metrics["units_total"] >= 80
    report = (Path(cfg.paths.tags) / "coverage.md").read_text()
    assert "| group | module | unit | chunks |" in report and "**missing**" in report
    # precision: a synthetic document's chunks are mostly about the group it was rendered
    # from (a defect paragraph naming SIMS or HRXRD rightly pulls in metrology units)
    in_group = [
        t["units"][0]["path"].startswith(read_json(Path(t["source"]).with_suffix(".json"))["group"] + "/")
        for t in tags
        if t["units"]
    ]
    assert sum(in_group) / len(in_group) >= 0.8, (sum(in_group), len(in_group))
    assert tag_ontology(cfg)["cache"]["misses"] == 0


@pytest.mark.e2e
def test_instruction_dataset_has_sources_splits_and_difficulties(text_run, kb):
    import datasets

    cfg, _, made = text_run
    out = Path(cfg.paths.instructions)
    splits = {s: datasets.Dataset.from_parquet(str(out / f"{s}.parquet")) for s in SPLITS}
    rows = [r for s in SPLITS for r in splits[s]]
    assert len(rows) == made["pairs"] >= 500
    assert {r["category"] for r in rows} == {"concepts", "etch_math", "process_control"}
    assert {r["difficulty"] for r in splits["benchmark"]} == {"easy", "medium", "hard"}
    paths = {r.path for r in kb.units()}
    chunk_ids = {c["chunk_id"] for c in read_jsonl(Path(cfg.paths.markdown) / "chunks.jsonl")}
    kinds = set()
    for r in rows:
        kind, _, ref = r["source"].partition(":")
        kinds.add(kind)
        assert (
            (kind == "kb" and ref in paths)
            or (kind == "chunk" and ref in chunk_ids)
            or (kind == "generator" and r["category"] == "etch_math")
        )
        assert r["messages"][0]["content"] == r["instruction"] and r["messages"][1]["role"] == "assistant"
        if r["category"] == "etch_math":
            ans = json.loads(r["answer"])
            assert ans["value"] == pytest.approx(_recompute(r["kind"], ans["inputs"]), rel=6e-3)
    assert kinds == {"kb", "chunk", "generator"}
    # no held-out answer is quoted inside a training answer (comparisons quote siblings,
    # corpus answers quote whole sections: grouping by module is what prevents this)
    train_text = "\n".join(r["response"] for r in splits["train"])
    for s in ("val", "test", "benchmark"):
        for r in splits[s]:
            if r["category"] != "etch_math":
                probe = r["response"][:150]
                assert len(probe) < 60 or probe not in train_text, (s, r["kind"], probe)
    # corpus answers are prose: no table rows, and nothing cut mid-answer when it fits
    for r in rows:
        if r["kind"] == "corpus":
            assert "|" not in r["response"]
            chunk = next(
                c
                for c in read_jsonl(Path(cfg.paths.markdown) / "chunks.jsonl")
                if f"chunk:{c['chunk_id']}" == r["source"]
            )
            if len(r["response"]) < cfg.synth_instructions.max_response_chars - 50:
                assert r["response"].split()[-1] in chunk["text"].split(), r["response"][-80:]
    assert len({r["instruction"] for r in rows}) == len(rows)
    metrics = read_json(Path(cfg.paths.metrics) / "instructions.json")
    assert sum(metrics["splits"][s]["rows"] for s in SPLITS) == len(rows)


def test_maths_drills_go_to_train_only_and_leave_the_other_splits_alone(text_run):
    cfg, *_ = text_run
    kb = load_knowledge(cfg.paths.knowledge)
    chunks = list(read_jsonl(Path(cfg.paths.markdown) / "chunks.jsonl"))
    tags = {t["chunk_id"]: t["units"] for t in read_jsonl(Path(cfg.paths.tags) / "tags.jsonl")}
    icfg = cfg.synth_instructions
    plain = build_pairs(kb, chunks, tags, icfg)
    drilled = build_pairs(kb, chunks, tags, icfg.model_copy(update={"n_math_drill": 40}))

    def held_out(pairs):
        return sorted((p["id"], p["split"]) for p in pairs if p["split"] != "train")

    assert held_out(drilled) == held_out(plain)  # the benchmark is the same with or without drills
    drills = [p for p in drilled if is_drill(p)]
    assert len(drills) == 40 and {p["split"] for p in drills} == {"train"}
    assert {p["kind"] for p in drills} == set(GENERATORS)
    assert not {p["instruction"] for p in drills} & {p["instruction"] for p in plain}
    for p in drills:
        ans = json.loads(p["answer"])
        assert ans["value"] == pytest.approx(_recompute(p["kind"], ans["inputs"]), rel=6e-3)
    # drills continue the problem sequence: the first n_math problems are the same either way
    assert problems(5, 0, start=3) == problems(8, 0)[3:]


def test_splits_are_stable_and_salted():
    cfg = SynthInstructionsConfig()
    keys = [f"unit_{i}" for i in range(400)]
    first = [assign_split(k, cfg) for k in keys]
    assert first == [assign_split(k, cfg) for k in keys]
    share = {s: first.count(s) / len(keys) for s in SPLITS}
    assert 0.6 < share["train"] < 0.8 and all(0.05 < share[s] < 0.16 for s in ("val", "test", "benchmark"))
    assert first != [assign_split(k, SynthInstructionsConfig(salt="other")) for k in keys]


# ---------------------------------------------------------------- backend: llm


@pytest.mark.e2e
def test_the_llm_backend_adds_grounded_pairs_and_only_right_maths(text_run):
    """A stand-in model with known habits: per chunk one pair quoted from the passage, one
    invented and one repeated; the maths right for every other problem."""
    from conftest import ChatStub

    from semilens.config import EndpointConfig
    from semilens.text.instruct_llm import MATH_PROMPT

    cfg, *_ = text_run
    synth_instructions(cfg)
    template = [r for s in SPLITS for r in read_jsonl_parquet(Path(cfg.paths.instructions) / f"{s}.parquet")]
    maths = {p.question: p for p in problems(cfg.synth_instructions.n_math, cfg.synth_instructions.seed)}
    right = {q for i, q in enumerate(maths) if i % 2 == 0}
    tail = MATH_PROMPT.format(question="")

    def model(body):
        prompt = body["messages"][-1]["content"]
        if prompt.endswith(tail):
            p = maths[prompt[: -len(tail)]]
            value = p.answer if p.question in right else p.answer * 3 + 1
            return f"Using {p.formula}: = {value:.4g} {p.unit}"
        passage = prompt.split("Passage:\n", 1)[1]
        quote = " ".join(passage.split()[:40])
        return json.dumps(
            {
                "pairs": [
                    {
                        "category": "concepts",
                        "difficulty": "medium",
                        "instruction": f"What does the passage starting '{quote[:30]}' state?",
                        "response": quote,
                    },
                    {
                        "category": "concepts",
                        "difficulty": "medium",
                        "instruction": f"What does the passage starting '{quote[:30]}' state?",
                        "response": quote,
                    },
                    {
                        "category": "process_control",
                        "difficulty": "hard",
                        "instruction": f"Which vendor sells tools for '{quote[:20]}'?",
                        "response": "Several vendors advertise proprietary turnkey solutions worldwide nowadays.",
                    },
                ]
            }
        )

    with ChatStub(default=model) as stub:
        icfg = cfg.synth_instructions.model_copy(
            update={"backend": "llm", "llm": EndpointConfig(base_url=stub.url, model="m", backoff_s=0)}
        )
        llm_cfg = cfg.model_copy(update={"synth_instructions": icfg})
        synth_instructions(llm_cfg)
        metrics = read_json(Path(cfg.paths.metrics) / "instructions.json")
        corpus = [p for p in template if p["kind"] == "corpus"]
        n_math = sum(p["category"] == "etch_math" for p in template)
        assert corpus and n_math and len(stub.requests) == len(corpus) + n_math
        assert metrics["counts"] == {
            "pairs_from_llm": len(corpus),
            "dropped_duplicate": len(corpus),
            "dropped_ungrounded": len(corpus),
            "math_answers_from_llm": sum(p["instruction"] in right for p in template if p["category"] == "etch_math"),
            "dropped_wrong_answer": sum(
                p["instruction"] not in right for p in template if p["category"] == "etch_math"
            ),
        }
        rows = [r for s in SPLITS for r in read_jsonl_parquet(Path(cfg.paths.instructions) / f"{s}.parquet")]
        by_id = {r["id"]: r for r in rows}
        assert {p["id"] for p in template} <= set(by_id)  # the template pairs all stay
        added = [r for r in rows if r["kind"] == "llm"]
        split_of = {p["source"]: p["split"] for p in corpus}
        assert len(added) == len(corpus) and all(r["split"] == split_of[r["source"]] for r in added)
        for p in template:
            if p["category"] == "etch_math":
                got = by_id[p["id"]]
                assert got["response"].startswith("Using") == (p["instruction"] in right)
                assert got["messages"][1]["content"] == got["response"]
        n = len(stub.requests)
        synth_instructions(llm_cfg)  # a re-run sends nothing
        assert (
            len(stub.requests) == n
            and read_json(Path(cfg.paths.metrics) / "instructions.json")["requests"]["requests_sent"] == 0
        )
    synth_instructions(cfg)


def read_jsonl_parquet(path: Path) -> list[dict]:
    import datasets

    return [dict(r) for r in datasets.Dataset.from_parquet(str(path))]
