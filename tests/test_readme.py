"""The README stays a short user guide that tells the truth: its pipeline diagram is the
current DVC stage graph, it stays short, its commands are the Makefile's, and every file it
(or a page under docs/) links to exists.

Regenerate the diagram after a change to dvc.yaml's stages or their dependencies:
``.venv/bin/python tests/test_readme.py`` prints the block to paste under "The pipeline".
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 260

_NODE = re.compile(r'^\s*(node\d+)\["([^"]+)"\]\s*$', re.M)
_EDGE = re.compile(r"^\s*(node\d+)-->(node\d+)\s*$", re.M)
_MERMAID_BLOCK = re.compile(r"^```mermaid\n(.*?)^```", re.M | re.S)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


# ---------------------------------------------------------------------------------------
# The diagram: `dvc dag`, one node per stage (matrix stages collapsed into one), and only
# the edges no longer path implies (its transitive reduction). Every stage feeds `report`,
# so the full graph's 57 edges hide the flow; the reduction keeps every node and every
# ordering while drawing about 20 arrows.
# ---------------------------------------------------------------------------------------


def stage_graph(root: Path = ROOT) -> nx.DiGraph:
    """DVC's stage graph as `dvc dag` prints it, with edges pointing downstream."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "dag", "--mermaid", "--collapse-foreach-matrix"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = dict(_NODE.findall(out))
    graph = nx.DiGraph()
    graph.add_nodes_from(names.values())
    graph.add_edges_from((names[a], names[b]) for a, b in _EDGE.findall(out))
    assert graph.number_of_nodes() > 0, f"`dvc dag` printed no stages:\n{out}"
    return graph


def mermaid(graph: nx.DiGraph) -> str:
    """The README's diagram: one line per stage that feeds others, in a stable order."""
    reduced = nx.transitive_reduction(graph)
    lines = ["flowchart TD"]
    for stage in nx.lexicographical_topological_sort(reduced):
        downstream = sorted(reduced.successors(stage))
        if downstream:
            lines.append(f"    {stage} --> {' & '.join(downstream)}")
    return "\n".join(lines)


def readme_diagram(text: str) -> str:
    blocks = _MERMAID_BLOCK.findall(text)
    assert len(blocks) == 1, f"README.md should hold one mermaid block, found {len(blocks)}"
    return blocks[0].strip()


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    return stage_graph()


def test_the_readme_diagram_is_the_current_dvc_stage_graph(graph):
    expected = mermaid(graph)
    found = readme_diagram(README.read_text())
    assert found == expected, (
        "README.md's pipeline diagram is not the current `dvc dag`; replace its mermaid block "
        f"with the output of `python tests/test_readme.py`:\n\n```mermaid\n{expected}\n```"
    )


def test_the_diagram_keeps_every_stage_and_every_ordering(graph):
    reduced = nx.transitive_reduction(graph)
    assert set(reduced.nodes) == set(graph.nodes)
    # Everything a stage needs is still upstream of it in the drawing.
    for stage in graph.nodes:
        assert nx.ancestors(reduced, stage) == nx.ancestors(graph, stage), stage


def test_the_readme_is_a_short_guide():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, (
        f"README.md has {n} lines (at most {MAX_README_LINES}): move reference to docs/ "
        "and experiment write-ups to docs/experiments/"
    )


def test_the_readme_commands_are_the_makefile_targets_ci_runs():
    text = README.read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("run", "test"):
        assert f"make {target}" in text
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no `{target}` target"
    assert re.search(r"^make test$", (ROOT / ".ci/run").read_text(), re.M), (
        ".ci/run should run the README's test command, `make test`"
    )


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        heading = line.lstrip("#").strip().lower()
        anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\- ]", "", heading)))
    return anchors


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in _LINK.findall(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
            broken.append(f"{target} (no such heading)")
    return broken


def test_every_relative_link_in_the_readme_and_docs_exists():
    pages = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    broken = {str(p.relative_to(ROOT)): b for p in pages if (b := _broken_links(p))}
    assert not broken, f"links to files or headings that do not exist: {broken}"


def test_the_link_check_catches_a_missing_file(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading\n")
    page.write_text(
        "[ok](there.md) [ok](there.md#a-heading) [web](https://example.org/x.md)\n"
        "[gone](missing.md) [bad anchor](there.md#nope)\n"
    )
    assert _broken_links(page) == ["missing.md (no such file)", "there.md#nope (no such heading)"]


if __name__ == "__main__":
    print(f"```mermaid\n{mermaid(stage_graph())}\n```")
