"""The process ontology and knowledge base: YAML the project writes and versions itself.

One file per process group under ``paths.knowledge`` (``knowledge/*.yaml``), each a
group -> modules -> units tree. A unit may name a ``parent`` unit of the same module, which
gives the deeper levels the ontology needs (patterning -> etching -> reactive ion etching
-> deep reactive ion etching). Units carry what the text path builds on: a description
(rendered into the sample PDFs, used for concept questions), key parameters, and typical
defects as symptom -> causes -> checks -> corrective actions (the diagnosis questions).

``load_knowledge(folder)`` validates everything and fails with the file and the key at
fault: a typo in a hand-written YAML must not silently drop a unit from the corpus.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The ten process groups, in flow order; every knowledge base must define exactly these.
PROCESS_GROUPS = (
    "substrate_preparation",
    "film_formation",
    "patterning",
    "doping",
    "planarization",
    "cleaning",
    "thermal_processing",
    "metrology",
    "advanced_modules",
    "back_end",
)

# Where in the flow a unit sits: before the transistors (substrate), front end of line,
# middle of line (contacts), back end of line (interconnect), both ends, or after the
# wafer leaves the fab (packaging).
Placement = Literal["substrate", "FEOL", "MOL", "BEOL", "FEOL+BEOL", "packaging"]

_ID = re.compile(r"^[a-z][a-z0-9_]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _text(value: str) -> str:
    value = " ".join(value.split())
    if not value:
        raise ValueError("must not be empty")
    return value


def _snake(value: str) -> str:
    if not _ID.match(value):
        raise ValueError(f"{value!r}: ids are snake_case ([a-z][a-z0-9_]*)")
    return value


class Parameter(_Strict):
    """A process knob: what it is, its usual range and what turning it does."""

    name: str
    unit: str  # "" for dimensionless
    typical: str  # a range or value as engineers quote it, e.g. "10-100"
    effect: str  # one sentence: what raising it does

    _clean = field_validator("name", "typical", "effect")(_text)


class Defect(_Strict):
    """A failure mode as a process engineer diagnoses it."""

    name: str
    symptom: str  # what is observed (inline metrology, inspection, electrical test)
    causes: list[str] = Field(min_length=1)
    checks: list[str] = Field(min_length=1)  # what to measure/inspect to tell causes apart
    actions: list[str] = Field(min_length=1)  # corrective actions

    _clean = field_validator("name", "symptom")(_text)


class Unit(_Strict):
    """One process technique (the ontology's leaves and sub-leaves)."""

    id: str
    name: str
    aliases: list[str] = []  # abbreviations and synonyms (RIE, CMP, ...): tagging keywords
    parent: str | None = None  # another unit of the same module this one specialises
    placement: Placement
    description: str  # a few technically correct sentences
    keywords: list[str] = Field(min_length=1)  # terms that signal this unit in a text
    parameters: list[Parameter] = Field(min_length=2)
    defects: list[Defect] = Field(min_length=1)

    _clean = field_validator("name", "description")(_text)
    _id = field_validator("id")(_snake)


class Module(_Strict):
    id: str
    name: str
    description: str
    units: list[Unit] = Field(min_length=1)

    _id = field_validator("id")(_snake)
    _clean = field_validator("name", "description")(_text)

    @model_validator(mode="after")
    def _parents(self) -> Module:
        ids = {u.id for u in self.units}
        for u in self.units:
            if u.parent is not None and (u.parent not in ids or u.parent == u.id):
                raise ValueError(f"unit {u.id}: parent {u.parent!r} is not another unit of module {self.id}")
        return self


class Group(_Strict):
    id: str
    name: str
    description: str
    modules: list[Module] = Field(min_length=1)

    @field_validator("id")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in PROCESS_GROUPS:
            raise ValueError(f"{v!r} is not one of the ten process groups {PROCESS_GROUPS}")
        return v


class UnitRef(_Strict):
    """A unit with its place in the tree: what taggers and generators iterate over."""

    group: Group
    module: Module
    unit: Unit

    @property
    def path(self) -> str:
        return f"{self.group.id}/{self.module.id}/{self.unit.id}"


class KnowledgeError(ValueError):
    """The knowledge base is malformed; the message names the file and the key."""


class Knowledge(_Strict):
    groups: list[Group]

    @model_validator(mode="after")
    def _check(self) -> Knowledge:
        found = [g.id for g in self.groups]
        missing = [g for g in PROCESS_GROUPS if g not in found]
        if missing or len(found) != len(set(found)):
            dup = [g for g, n in Counter(found).items() if n > 1]
            raise ValueError(f"process groups missing {missing} or repeated {dup}")
        ids = Counter(u.id for g in self.groups for m in g.modules for u in m.units)
        ids.update(m.id for g in self.groups for m in g.modules)
        dup = sorted(i for i, n in ids.items() if n > 1)
        if dup:
            raise ValueError(f"module/unit ids must be unique across the knowledge base: {dup}")
        return self

    def units(self) -> Iterator[UnitRef]:
        for g in sorted(self.groups, key=lambda g: PROCESS_GROUPS.index(g.id)):
            for m in g.modules:
                for u in m.units:
                    yield UnitRef(group=g, module=m, unit=u)

    def unit(self, unit_id: str) -> UnitRef:
        for ref in self.units():
            if ref.unit.id == unit_id:
                return ref
        raise KeyError(unit_id)

    def depth(self, ref: UnitRef) -> int:
        """Levels below the module: 1 for a unit, 2 for a unit with a parent, ..."""
        units = {u.id: u for u in ref.module.units}
        depth, unit = 1, ref.unit
        while unit.parent is not None:
            depth, unit = depth + 1, units[unit.parent]
            if depth > len(units):
                raise KnowledgeError(f"unit {ref.unit.id}: parent chain loops")
        return depth


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: YAML keeps the last silently,
    which would drop half of a hand-edited unit without a word."""


def _no_duplicate_keys(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def load_knowledge(folder: Path) -> Knowledge:
    """Every ``*.yaml`` in ``folder`` is one group; sorted by name so loading is stable."""
    files = sorted(Path(folder).glob("*.yaml"))
    if not files:
        raise KnowledgeError(f"{folder}: no knowledge-base YAML files (one per process group)")
    groups = []
    for f in files:
        try:
            raw = yaml.load(f.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
            groups.append(Group.model_validate(raw))
        except yaml.YAMLError as e:
            raise KnowledgeError(f"{f}: not valid YAML: {e}") from None
        except ValidationError as e:
            raise KnowledgeError(f"{f}: {_problems(e)}") from None
    try:
        kb = Knowledge(groups=groups)
    except ValidationError as e:
        raise KnowledgeError(f"{folder}: {_problems(e)}") from None
    for ref in kb.units():
        kb.depth(ref)  # rejects parent loops
    return kb
