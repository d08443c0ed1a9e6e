"""synth_instructions: instruction-response pairs in the SemiKong recipe's three categories.

Reads the knowledge base, ``paths.markdown/chunks.jsonl`` and ``paths.tags/tags.jsonl``;
writes ``paths.instructions/{train,val,test,benchmark}.parquet`` (loadable with
``datasets``) and ``metrics/instructions.json``. Run: ``python -m stages.synth_instructions``.

- ``concepts``: what a unit is and where it sits in the flow, its key parameters, how two
  sibling techniques differ (knowledge base); and explanations grounded in a corpus chunk
  (the chunk tagged with the unit, quoted as the answer, its id kept as the source).
- ``etch_math``: generated problems with computed answers (``semilens.text.etch_math``).
- ``process_control``: a parameter out of its window -> what happens and what to do, and
  defect diagnosis: symptom -> likely causes -> checks -> corrective actions.

With ``backend: llm`` a model on an OpenAI-compatible server adds checked pairs written
from the corpus and works the maths (see semilens.text.instruct_llm).

Every pair keeps its ``source`` (``kb:<group/module/unit>``, ``chunk:<id>`` or
``generator:<kind>``) and a ``difficulty`` (easy / medium / hard). Splits are drawn by a
salted hash of a group key: the module for knowledge-base and corpus pairs (a comparison
quotes its sibling units, so a whole module goes to one split and no benchmark answer
appears inside a training answer), the problem for maths. The ``n_math_drill`` further
problems go to train only: more maths to learn from, the other splits unchanged.
``benchmark`` is a fourth, held-out split that keeps all three difficulty levels. The
output is deterministic for given inputs.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from semilens.config import Config, SynthInstructionsConfig
from semilens.io import read_jsonl, write_json
from semilens.text.etch_math import problems
from semilens.text.knowledge import Knowledge, UnitRef, load_knowledge

STAGE = "synth_instructions"
SPLITS = ("train", "val", "test", "benchmark")
DRILL = "drill"  # the split group prefix of the train-only maths problems


def is_drill(pair: dict[str, Any]) -> bool:
    return pair["group_key"].startswith(f"{DRILL}:")


def module_key(ref: UnitRef) -> str:
    """The split group of knowledge-base pairs: the module. A comparison quotes a sibling's
    description, so siblings must share a split or one split's answers leak into another's."""
    return f"{ref.group.id}/{ref.module.id}"


def _pair(
    category: str, kind: str, difficulty: str, instruction: str, response: str, source: str, group: str, **extra: Any
) -> dict[str, Any]:
    body = {"instruction": instruction, "response": response, "source": source}
    return {
        "id": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16],
        "category": category,
        "kind": kind,
        "difficulty": difficulty,
        "instruction": instruction,
        "response": response,
        "source": source,
        "group_key": group,
        "answer": json.dumps(extra.get("answer")) if "answer" in extra else "",
    }


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _join(items: list[str]) -> str:
    items = [i.rstrip(".") for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


PLACEMENT_WORDS = {
    "substrate": "a substrate (wafer) step, before any device is built",
    "FEOL": "a front-end-of-line (FEOL) step, where the transistors are formed",
    "MOL": "a middle-of-line (MOL) step, contacting the devices",
    "BEOL": "a back-end-of-line (BEOL) step, in the interconnect stack",
    "FEOL+BEOL": "used in both the front end (FEOL) and the back end (BEOL) of line",
    "packaging": "a packaging step, after the wafer leaves the fab",
}


def concept_pairs(kb: Knowledge, rng: random.Random) -> list[dict[str, Any]]:
    out = []
    for ref in kb.units():
        u, key, src = ref.unit, module_key(ref), f"kb:{ref.path}"
        name = u.name + (f" ({u.aliases[0]})" if u.aliases else "")
        ask = rng.choice(
            [
                "What is {n} and what is it used for?",
                "Explain {n} to a process engineer.",
                "Describe {n}: mechanism, use and trade-offs.",
            ]
        )
        out.append(_pair("concepts", "definition", "easy", ask.format(n=name), u.description, src, key))
        parent = next((p.name for p in ref.module.units if p.id == u.parent), None)
        where = (
            f"{u.name} belongs to {ref.module.name.lower()} within the {ref.group.name.lower()} process group"
            + (f", as a variant of {parent}" if parent else "")
            + f". It is {PLACEMENT_WORDS[u.placement]}."
        )
        out.append(
            _pair("concepts", "placement", "easy", f"Where does {name} sit in the process flow?", where, src, key)
        )
        params = "\n".join(
            f"- {p.name} ({p.typical}{' ' + p.unit if p.unit else ''}): {_sentence(p.effect)}" for p in u.parameters
        )
        out.append(
            _pair(
                "concepts",
                "parameters",
                "medium",
                f"Which parameters control {name}, and what does raising each do?",
                f"The key knobs of {u.name}:\n{params}",
                src,
                key,
            )
        )
        siblings = [s for s in ref.module.units if s.id != u.id]
        if siblings:
            other = rng.choice(siblings)
            resp = f"{u.name}: {u.description}\n\n{other.name}: {other.description}"
            if u.parent == other.id or other.parent == u.id:
                resp += f"\n\nOne is a specialised form of the other within {ref.module.name.lower()}."
            out.append(
                _pair(
                    "concepts",
                    "comparison",
                    "hard",
                    f"Compare {u.name} with {other.name}: how do they differ and when would you choose each?",
                    resp,
                    src,
                    key,
                )
            )
    return out


def chunk_pairs(
    chunks: list[dict[str, Any]],
    tags: dict[str, list[dict[str, Any]]],
    kb: Knowledge,
    rng: random.Random,
    max_chars: int,
    cfg: SynthInstructionsConfig,
) -> list[dict[str, Any]]:
    """Explanations grounded in the corpus: the chunk's prose answers a question about its top unit.

    Table rows are left out of the answer (a model should not learn to recite pipes), and a
    chunk whose tagged units sit in modules of different splits is skipped: its text would
    put one split's answers into another's.
    """
    out = []
    for c in chunks:
        units = tags.get(c["chunk_id"], [])
        if not units:
            continue
        refs = [kb.unit(u["unit"]) for u in units]
        if len({assign_split(module_key(r), cfg) for r in refs}) > 1:
            continue
        prose = [
            p
            for p in c["text"].strip().split("\n\n")
            if not p.startswith("#") and not any(line.lstrip().startswith("|") for line in p.splitlines())
        ]
        body = "\n\n".join(prose)
        if len(body) < 200:
            continue
        if len(body) > max_chars:  # cut at a word boundary, only when it has to be cut
            body = body[:max_chars].rsplit(" ", 1)[0]
        ref = refs[0]
        heading = c["headings"][-1] if c["headings"] else ref.unit.name
        ask = rng.choice(
            [
                "According to the process notes, what should an engineer know about {h}?",
                "Summarise the key points on {h} for a colleague taking over the tool.",
                "What do the notes say about {h}?",
            ]
        )
        out.append(
            _pair(
                "concepts", "corpus", "medium", ask.format(h=heading), body, f"chunk:{c['chunk_id']}", module_key(ref)
            )
        )
    return out


def control_pairs(kb: Knowledge, rng: random.Random) -> list[dict[str, Any]]:
    out = []
    for ref in kb.units():
        u, key, src = ref.unit, module_key(ref), f"kb:{ref.path}"
        for p in u.parameters:
            way = rng.choice(["drifts above", "is pushed above", "runs high, above"])
            out.append(
                _pair(
                    "process_control",
                    "parameter_drift",
                    "easy",
                    f"In {u.name}, the {p.name.lower()} {way} its usual window ({p.typical}{' ' + p.unit if p.unit else ''}). What happens?",
                    f"{_sentence(p.effect)} Bring it back inside {p.typical}{' ' + p.unit if p.unit else ''} and re-qualify the affected lots.",
                    src,
                    key,
                )
            )
        for d in u.defects:
            symptom = _sentence(d.symptom)
            out.append(
                _pair(
                    "process_control",
                    "diagnosis_causes",
                    "medium",
                    f"After {u.name}: {symptom} What are the likely causes?",
                    f"This points to {d.name.lower()}. Likely causes: {'; '.join(c.rstrip('.') for c in d.causes)}.",
                    src,
                    key,
                )
            )
            out.append(
                _pair(
                    "process_control",
                    "diagnosis_full",
                    "hard",
                    f"{u.name} problem: {symptom} Diagnose it: likely causes, the checks that tell them apart, and the corrective actions.",
                    "\n".join(
                        [
                            f"Defect: {d.name}.",
                            "Likely causes: " + "; ".join(c.rstrip(".") for c in d.causes) + ".",
                            "Checks: " + "; ".join(c.rstrip(".") for c in d.checks) + ".",
                            "Corrective actions: " + "; ".join(a.rstrip(".") for a in d.actions) + ".",
                        ]
                    ),
                    src,
                    key,
                )
            )
    return out


def math_pairs(n: int, seed: int, start: int = 0, group: str = "math") -> list[dict[str, Any]]:
    """Problems ``start`` to ``start + n - 1`` as pairs, each its own split group."""
    return [
        _pair(
            "etch_math",
            p.kind,
            p.difficulty,
            p.question,
            p.response,
            f"generator:{p.kind}",
            f"{group}:{i}",
            answer={"value": p.answer, "unit": p.unit, "inputs": p.inputs, "formula": p.formula},
        )
        for i, p in enumerate(problems(n, seed, start), start)
    ]


def assign_split(group_key: str, cfg: SynthInstructionsConfig) -> str:
    h = int(hashlib.sha256(f"{cfg.salt}:{group_key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    edges = [
        cfg.val_fraction,
        cfg.val_fraction + cfg.test_fraction,
        cfg.val_fraction + cfg.test_fraction + cfg.benchmark_fraction,
    ]
    if h < edges[0]:
        return "val"
    if h < edges[1]:
        return "test"
    if h < edges[2]:
        return "benchmark"
    return "train"


def build_pairs(
    kb: Knowledge, chunks: list[dict[str, Any]], tags: dict[str, list[dict[str, Any]]], cfg: SynthInstructionsConfig
) -> list[dict[str, Any]]:
    rng = random.Random(cfg.seed)
    pairs = (
        concept_pairs(kb, rng)
        + chunk_pairs(chunks, tags, kb, rng, cfg.max_response_chars, cfg)
        + control_pairs(kb, rng)
        + math_pairs(cfg.n_math, cfg.seed)
    )
    # Drills continue the same problem sequence after the first n_math and come last, so
    # the dedup below drops any that repeats a question already in a split
    drills = math_pairs(cfg.n_math_drill, cfg.seed, start=cfg.n_math, group=DRILL)
    seen: set[str] = set()
    unique = []
    for p in pairs + drills:  # the same question twice (two chunks with one heading) would leak across splits
        if p["instruction"] in seen:
            continue
        seen.add(p["instruction"])
        unique.append(p)
    for p in unique:
        p["split"] = "train" if is_drill(p) else assign_split(p["group_key"], cfg)
        p["messages"] = [{"role": "user", "content": p["instruction"]}, {"role": "assistant", "content": p["response"]}]
    return unique


def synth_instructions(cfg: Config) -> dict[str, Any]:
    import datasets

    icfg = cfg.synth_instructions
    kb = load_knowledge(cfg.paths.knowledge)
    chunks = list(read_jsonl(Path(cfg.paths.markdown) / "chunks.jsonl"))
    tags = {t["chunk_id"]: t["units"] for t in read_jsonl(Path(cfg.paths.tags) / "tags.jsonl")}
    pairs = build_pairs(kb, chunks, tags, icfg)
    backend: dict[str, Any] = {"backend": "templates"}
    if icfg.backend == "llm":
        from semilens.text.instruct_llm import llm_pairs

        pairs, backend = llm_pairs(pairs, {c["chunk_id"]: c for c in chunks}, icfg, cfg.paths.cache, _pair)
        for p in pairs:
            p["messages"] = [
                {"role": "user", "content": p["instruction"]},
                {"role": "assistant", "content": p["response"]},
            ]
    out = Path(cfg.paths.instructions)
    out.mkdir(parents=True, exist_ok=True)
    if not pairs:
        raise ValueError("no instruction pairs: the knowledge base and corpus gave nothing to ask about")
    # One schema for every split, an empty one included: split files load together.
    full = datasets.Dataset.from_list(sorted(pairs, key=lambda p: p["id"]))
    counts: dict[str, Any] = {}
    for split in SPLITS:
        rows = [p for p in sorted(pairs, key=lambda p: p["id"]) if p["split"] == split]
        ds = full.filter(lambda r, split=split: r["split"] == split)
        tmp = out / f".{split}.parquet.tmp"
        ds.to_parquet(str(tmp))
        tmp.replace(out / f"{split}.parquet")
        counts[split] = {
            "rows": len(rows),
            "by_category": dict(sorted(Counter(p["category"] for p in rows).items())),
            "by_difficulty": dict(sorted(Counter(p["difficulty"] for p in rows).items())),
        }
    metrics = {
        "pairs": len(pairs),
        "by_category": dict(sorted(Counter(p["category"] for p in pairs).items())),
        "by_kind": dict(sorted(Counter(p["kind"] for p in pairs).items())),
        "math_drill": sum(map(is_drill, pairs)),
        "splits": counts,
        **backend,
    }
    write_json(Path(cfg.paths.metrics) / "instructions.json", metrics)
    return {"pairs": len(pairs), **{s: counts[s]["rows"] for s in SPLITS}}
