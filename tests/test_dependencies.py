"""Every third-party package the library and the stages import is declared in
pyproject.toml (the dependencies, or the extra whose branch imports it), so a fresh
install never meets an ImportError that only a transitive dependency happened to hide."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = [ROOT / "src" / "semilens", ROOT / "stages", ROOT / "scripts"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(pyproject: dict, requirements: list[str] = ()) -> set[str]:
    """Distribution names in [project] dependencies, every extra and the requirements
    files `make setup` installs with --no-deps (llmcompressor's pins), normalised."""
    project = pyproject["project"]
    specs = list(project.get("dependencies", [])) + [r for r in requirements if r.strip() and not r.startswith("#")]
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    return {_norm(re.split(r"[\s<>=!~\[;]", s, maxsplit=1)[0]) for s in specs}


def imported_top_levels(folders: list[Path]) -> dict[str, str]:
    """Top-level module name -> one file importing it (absolute imports only)."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(folder.parent)))
    return found


def undeclared(imports: dict[str, str], names: set[str], dists: dict[str, list[str]]) -> list[str]:
    own = {"semilens", "stages", "conftest"}
    missing = []
    for module, where in sorted(imports.items()):
        if module in own or module in sys.stdlib_module_names:
            continue
        # a module an installed distribution provides, else (not installed here: a GPU
        # extra) the module's own name as the distribution's
        candidates = {_norm(d) for d in dists.get(module, [])} or {_norm(module)}
        if not candidates & names:
            missing.append(f"{module} (imported in {where}; provided by {', '.join(sorted(candidates))})")
    return missing


def test_every_imported_package_is_declared():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    requirements = [ln.strip() for f in sorted(ROOT.glob("requirements-*.txt")) for ln in f.read_text().splitlines()]
    missing = undeclared(imported_top_levels(CODE), declared(pyproject, requirements), packages_distributions())
    assert not missing, "imported but not declared in pyproject.toml:\n  " + "\n  ".join(missing)


def test_an_undeclared_import_is_named(tmp_path: Path):
    (tmp_path / "m.py").write_text("import numpy\nimport os\nfrom yaml import safe_load\nimport notapkg.sub\n")
    imports = imported_top_levels([tmp_path])
    names = declared({"project": {"dependencies": ["numpy>=1"], "optional-dependencies": {"x": ["PyYAML"]}}})
    missing = undeclared(imports, names, {"numpy": ["numpy"], "yaml": ["PyYAML"]})
    assert missing == [f"notapkg (imported in {tmp_path.name}/m.py; provided by notapkg)"]
