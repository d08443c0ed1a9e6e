"""Model cards: the README.md in each checkpoint folder, with lineage and scores.

A card is Markdown with YAML front matter (the Hugging Face model-card layout, so hub
tooling and people read the same file). Its content is derived from hashes and metrics
only, never from run ids or clocks, so a card is byte-identical when the pipeline is
re-run on the same inputs and DVC sees no change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from semilens.io import atomic_write_text

CARD_FILE = "README.md"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|")


def table(rows: Iterable[Mapping[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def lineage_table(lineage: Mapping[str, Mapping[str, str]]) -> str:
    """``{role: {"path", "md5", ...}}`` as a table (md5 as DVC records it in dvc.lock)."""
    return table(
        [{"artifact": role, **entry} for role, entry in lineage.items()],
        ["artifact", "path", "md5"],
    )


def write_card(folder: Path, title: str, front_matter: Mapping[str, Any], sections: list[tuple[str, str]]) -> Path:
    """Write ``folder/README.md``; ``sections`` are (heading, Markdown body) pairs."""
    meta = yaml.safe_dump(dict(front_matter), sort_keys=False).strip()
    body = "\n\n".join(f"## {heading}\n\n{text.strip()}" for heading, text in sections)
    path = Path(folder) / CARD_FILE
    atomic_write_text(path, f"---\n{meta}\n---\n\n# {title}\n\n{body}\n")
    return path
