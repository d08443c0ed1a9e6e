"""clean_markdown with ``backend: llm``: a language model on an OpenAI-compatible server
polishes each block the rules produced, and a check refuses any rewrite that loses or
invents content.

The rules (semilens.text.clean) run first and fix what rules can: running lines,
reading order, tables, headings, hyphenation. Each paragraph and table block then goes
to the server through ``semilens.openai_client`` (concurrent, retried, cached per
request) with the instruction to fix broken lines, spacing and table cells, keep every
equation and number, and return Markdown only. A rewrite is accepted only if:

- it keeps at least ``1 - max_dropped`` of the block's words (letters only, as a
  multiset, case folded): a model that summarises or truncates is refused
  (``dropped_content``);
- every number of the block appears in it (``dropped_numbers``): equations, values and
  units are the content engineers need and the easiest thing for a model to garble;
- at most ``max_added`` of its words are new (``added_content``): a model that explains
  or continues the text is refused.

A refused or failed block keeps the rules' text, so nothing is lost; headings are never
sent. Each block keeps its page provenance either way, and ``metrics/clean.json`` counts
what was accepted and refused and why.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from semilens.config import CleanMarkdownConfig
from semilens.openai_client import Client, Request

SYSTEM = (
    "You repair text extracted from a PDF of a semiconductor process document. Fix broken "
    "lines, words split across lines, stray spaces and misaligned table cells. Keep every "
    "sentence, every number, unit and equation exactly; do not summarise, explain or add "
    "anything. Reply with the repaired Markdown only."
)
_WORD = re.compile(r"[A-Za-z]+")  # numbers are checked on their own, and strictly
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")


def words(text: str) -> Counter[str]:
    return Counter(w.lower() for w in _WORD.findall(text))


def check_rewrite(source: str, rewrite: str, max_dropped: float, max_added: float) -> str | None:
    """None if ``rewrite`` keeps the content of ``source``, else the reason it is refused."""
    before, after = words(source), words(rewrite)
    total = sum(before.values())
    if not rewrite.strip():
        return "empty"
    kept = sum((before & after).values())
    if total and kept / total < 1 - max_dropped:
        return "dropped_content"
    if Counter(_NUMBER.findall(source)) - Counter(_NUMBER.findall(rewrite)):
        return "dropped_numbers"
    new = sum((after - before).values())
    if new / max(1, sum(after.values())) > max_added:
        return "added_content"
    return None


def polish(
    results: list[dict[str, Any]], ccfg: CleanMarkdownConfig, cache_root: Path | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``results`` (clean_document outputs, one per document) with every accepted
    rewrite in place and the Markdown rebuilt, and the backend's report."""
    targets = [(d, i) for d, r in enumerate(results) for i, b in enumerate(r["blocks"]) if b["kind"] != "heading"]
    client = Client(ccfg.llm, cache_root, cache_stage="clean_markdown_llm")
    outcomes = client.run(
        [
            Request(
                [{"role": "system", "content": SYSTEM}, {"role": "user", "content": results[d]["blocks"][i]["text"]}],
                tag=f"doc {d} block {i}",
            )
            for d, i in targets
        ]
    )
    counts: Counter[str] = Counter()
    blocks = [[dict(b) for b in r["blocks"]] for r in results]
    for (d, i), outcome in zip(targets, outcomes):
        block = blocks[d][i]
        if outcome.error is not None:
            counts[f"failed_{outcome.error.kind}"] += 1
            continue
        reason = check_rewrite(block["text"], outcome.text or "", ccfg.max_dropped, ccfg.max_added)
        if reason is not None:
            counts[f"refused_{reason}"] += 1
            continue
        counts["accepted"] += 1
        block["text"] = (outcome.text or "").strip()
        block["written_by"] = "llm"
    polished = [
        {**r, "blocks": b, "markdown": "\n\n".join(x["text"] for x in b) + "\n"} for r, b in zip(results, blocks)
    ]
    report = {
        "backend": "llm",
        "base_url": ccfg.llm.base_url,
        "model": ccfg.llm.model,
        "blocks_sent": len(targets),
        "counts": dict(sorted(counts.items())),
        "requests": client.accounting.as_dict(),
    }
    return polished, report
