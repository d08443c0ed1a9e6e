"""dvc.yaml's code dependencies are the stages' imports: no more, no less.

For every stage (every matrix entry), the test starts at the module its `cmd` runs
(`python -m stages.<name>`), follows every import inside `stages/` and `src/semilens/` with
`ast` (top-level and lazy ones inside functions, relative ones, `importlib.import_module`
with a literal name), and compares the modules reached, plus the non-Python files those
modules read at run time, with the stage's `deps` under `stages/` and `src/semilens/`.
A module the stage imports but does not list means editing it would not re-run the stage
(and `dvc.lock` would not record the code that made the output); a listed module it does
not import re-runs the stage for nothing.

Nothing is imported or executed: the walk parses source only, so it takes about a second
(each file parsed once) and sees the lazy imports a `sys.modules` snapshot would miss.

Run: pytest tests/test_dvc_deps.py
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# The one module that is deliberately not a code dep of any stage. config.py grows a
# section for every stage, so listing it would re-run the whole pipeline whenever any
# stage gains a setting; the values a stage reads are tracked through its `params`
# instead (dvc.yaml's header says so). That is sound only while params.yaml is complete:
# every setting a stage uses is present there, so config.py's defaults never decide a
# pipeline value. Its own imports are still followed: a module config.py pulls in is code.
NOT_CODE_DEPS = frozenset({"src/semilens/config.py"})

# Non-Python files under src/semilens a module reads at run time, by module. A stage that
# imports the module lists these too: editing a rubric changes the judge's scores. An
# empty tuple marks a module that touches `__file__` only to hash its own source into a
# cache key (already covered by the module being a dep). A new data file, or a new module
# using `importlib.resources` or `__file__`, fails `test_every_data_file_has_a_reader`
# until it is entered here.
DATA_READ_BY: dict[str, tuple[str, ...]] = {
    "src/semilens/llm/judge.py": ("src/semilens/llm/rubric",),  # files("semilens.llm") / "rubric"
    "src/semilens/llm/pretrain.py": (),
    "src/semilens/llm/sft.py": (),
    "src/semilens/vlm/finetune.py": (),
}

# Files under src/semilens that no code reads: py.typed is the PEP 561 marker for type
# checkers.
NOT_READ = frozenset({"src/semilens/py.typed"})

# A matrix entry over VLM families (`${item.family}`) lists only its own family's module.
# vlm/families.py imports every family module to build its registry, but an entry calls
# only its own family's functions, so an edit to mllama.py must not re-run the qwen2_5_vl
# stages. What the sibling modules import at module level is still followed and required.
FAMILY_MODULE = "src/semilens/vlm/{}.py"

STAGE_CMD = re.compile(r"python -m (stages\.\w+)")
CODE_PREFIXES = ("stages/", "src/semilens/")


# ---------------------------------------------------------------------------- the walk


def module_file(name: str, root: Path) -> Path | None:
    """The source file of a dotted module inside the project, or None if it is not one
    (a third-party package, or a name that is an attribute rather than a module)."""
    parts = name.split(".")
    if parts[0] == "semilens":
        base = root / "src"
    elif parts[0] == "stages":
        base = root
    else:
        return None
    path = base.joinpath(*parts)
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _prefixes(name: str) -> list[str]:
    # importing a.b.c runs a/__init__ and a/b/__init__ first
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@dataclass
class Imports:
    names: set[str] = field(default_factory=set)  # dotted names, maybe attributes not modules
    unresolved: list[str] = field(default_factory=list)  # dynamic imports the walk cannot name
    code_less: bool = False  # see is_code_less


def imports_of(path: Path, module: str) -> Imports:
    """Every import in one source file, at any depth, except `if TYPE_CHECKING:` blocks
    (never executed). Relative imports are made absolute against `module`."""
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = Imports(code_less=is_code_less(tree))

    def visit(node: ast.AST) -> None:
        # import statements sit in statement bodies at any depth (functions, branches, try);
        # expressions are skipped here, which keeps the walk fast, and searched below
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.names.update(_prefixes(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.names.update(_prefixes(base))
            # `from semilens.vlm import chat` imports the module semilens.vlm.chat
            found.names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                visit(child)

    visit(tree)
    if "import_module" not in source and "__import__" not in source:
        return found
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _calls_import_module(node):
            args = node.args
            if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                name = args[0].value
                if name.startswith("."):
                    anchor = args[1] if len(args) > 1 else None
                    if not (isinstance(anchor, ast.Constant) and isinstance(anchor.value, str)):
                        found.unresolved.append(f"{path}:{node.lineno}")
                        continue
                    level = len(name) - len(name.lstrip("."))
                    anchor_parts = anchor.value.split(".")
                    name = ".".join(anchor_parts[: len(anchor_parts) - (level - 1)] + [name.lstrip(".")])
                found.names.update(_prefixes(name))
            else:
                found.unresolved.append(f"{path}:{node.lineno}")
    return found


def _calls_import_module(node: ast.Call) -> bool:
    func = node.func
    return (isinstance(func, ast.Name) and func.id in ("import_module", "__import__")) or (
        isinstance(func, ast.Attribute) and func.attr in ("import_module", "__import__")
    )


def is_code_less(tree: ast.Module) -> bool:
    """A file with no code: only a docstring, `from __future__` and constant assignments
    (the packages' `__init__.py`, `__version__`). Importing it cannot change an output, so
    it need not be listed; once it gains code it must be."""
    for stmt in tree.body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue
        if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
            continue
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and isinstance(stmt.value, ast.Constant):
            continue
        return False
    return True


def import_closure(entry: str, root: Path, memo: dict | None = None) -> tuple[dict[str, Imports], list[str]]:
    """The project files (relative to root) that running module `entry` imports, directly
    or not, each with what it imports, and the dynamic imports whose name the walk could
    not read. `memo` keeps each file's imports across the stages of one check: most stages
    share most modules."""
    memo = {} if memo is None else memo
    seen: dict[str, Path] = {}
    files: dict[str, Imports] = {}
    unresolved: list[str] = []
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name, root)
        if path is None:
            continue
        seen[name] = path
        if (path, name) not in memo:
            memo[path, name] = imports_of(path, name)
        found = memo[path, name]
        files[path.relative_to(root).as_posix()] = found
        unresolved += found.unresolved
        todo += sorted(found.names - seen.keys())
    return files, unresolved


# ---------------------------------------------------------------------------- the stages


@dataclass(frozen=True)
class Stage:
    name: str  # prepare_vlm@qwen2_5_vl for a matrix entry
    entry: str  # the module its cmd runs
    deps: tuple[str, ...]  # as written, templates of `item` resolved
    family: str | None  # the VLM family of a matrix entry over families
    families: tuple[str, ...]  # all families of that matrix


def stages_of(dvc: dict) -> list[Stage]:
    """Every stage of a dvc.yaml dict, one per matrix entry. Only `${item.*}` is expanded:
    the `${paths.*}` deps are data, never under stages/ or src/semilens."""
    out = []
    for name, body in dvc["stages"].items():
        matrix = body.get("matrix")
        if matrix is None:
            items: list[dict[str, str]] = [{}]
        else:
            assert len(matrix) == 1, f"{name}: the checker knows only a matrix over one key (family, model)"
            ((key, values),) = matrix.items()
            items = [{key: v} for v in values]
        for item in items:

            def fill(text: str, item: dict[str, str] = item) -> str:
                return re.sub(r"\$\{item\.(\w+)\}", lambda m: item[m.group(1)], text)

            match = STAGE_CMD.search(body["cmd"])
            assert match, f"{name}: cmd {body['cmd']!r} does not run `python -m stages.<name>`"
            out.append(
                Stage(
                    name=f"{name}@{next(iter(item.values()))}" if item else name,
                    entry=match.group(1),
                    deps=tuple(fill(str(d)) for d in body.get("deps", [])),
                    family=item.get("family"),
                    families=tuple(matrix.get("family", ())) if matrix else (),
                )
            )
    return out


@dataclass
class Problems:
    missing: list[str]  # imported (or read) but not a dep
    unused: list[str]  # a dep but not imported (or read)
    other: list[str]  # script not first, config.py listed, a dynamic import the walk cannot name


def check_stage(
    stage: Stage, root: Path, data_read_by: dict[str, tuple[str, ...]] = DATA_READ_BY, memo: dict | None = None
) -> Problems:
    files, unresolved = import_closure(stage.entry, root, memo)
    reached = set(files)
    required = {p for p, found in files.items() if p not in NOT_CODE_DEPS and not found.code_less}
    if stage.family is not None:
        required -= {FAMILY_MODULE.format(f) for f in stage.families if f != stage.family}
    data = {d for p in reached for d in data_read_by.get(p, ())}
    listed = {d.rstrip("/") for d in stage.deps if d.startswith(CODE_PREFIXES)}
    script = stage.entry.replace(".", "/") + ".py"
    other = [f"dynamic import the test cannot follow at {u}" for u in unresolved]
    if not stage.deps or stage.deps[0] != script:
        other.append(f"first dep should be its script {script}")
    other += [f"{p} is deliberately not a code dep (see NOT_CODE_DEPS)" for p in sorted(listed & NOT_CODE_DEPS)]
    return Problems(
        missing=sorted((required | data) - listed),
        # a listed code-less __init__.py that is imported is harmless, not unused
        unused=sorted(listed - reached - data - NOT_CODE_DEPS),
        other=other,
    )


def check(dvc: dict, root: Path, data_read_by: dict[str, tuple[str, ...]] = DATA_READ_BY) -> dict[str, Problems]:
    """The stages whose code deps disagree with their imports, and how."""
    found, memo = {}, {}
    for stage in stages_of(dvc):
        problems = check_stage(stage, root, data_read_by, memo)
        if problems.missing or problems.unused or problems.other:
            found[stage.name] = problems
    return found


def describe(found: dict[str, Problems]) -> str:
    lines = []
    for name, p in found.items():
        lines.append(f"{name}:")
        lines += [f"  missing (imported, not a dep): {m}" for m in p.missing]
        lines += [f"  unused (a dep, not imported): {u}" for u in p.unused]
        lines += [f"  {o}" for o in p.other]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the tests


def test_every_stage_lists_exactly_the_code_it_imports():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    found = check(dvc, ROOT)
    assert not found, "dvc.yaml code deps disagree with the imports:\n" + describe(found)


def finds_files_beside_itself(path: Path) -> bool:
    """Whether a module uses `__file__` or `importlib.resources`: the two ways code here
    could find a file shipped in the package (mentions in docstrings do not count)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name) and node.id == "__file__":
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("importlib.resources"):
            return True
        if isinstance(node, ast.Import) and any(a.name.startswith("importlib.resources") for a in node.names):
            return True
    return False


def _files_under(root: Path, top: str) -> Iterable[str]:
    for path in sorted((root / top).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            yield path.relative_to(root).as_posix()


def test_every_data_file_has_a_reader():
    """Every non-Python file under src/semilens is read by a module named in DATA_READ_BY
    (or is in NOT_READ), and every module that finds files beside itself is named there,
    so the stage-level check cannot miss a data file a stage reads."""
    claimed = [d for reads in DATA_READ_BY.values() for d in reads]

    def is_claimed(f: str) -> bool:
        return f in NOT_READ or any(f == d or f.startswith(d + "/") for d in claimed)

    unclaimed = [f for f in _files_under(ROOT, "src/semilens") if not f.endswith(".py") and not is_claimed(f)]
    assert not unclaimed, f"data files no entry of DATA_READ_BY reads: {unclaimed}"

    readers = []
    for f in _files_under(ROOT, "src/semilens"):
        if not f.endswith(".py"):
            continue
        if finds_files_beside_itself(ROOT / f) and f not in DATA_READ_BY:
            readers.append(f)
    assert not readers, f"modules that read files beside themselves, not in DATA_READ_BY: {readers}"
    stale = [m for m in DATA_READ_BY if not (ROOT / m).is_file() or not finds_files_beside_itself(ROOT / m)]
    assert not stale, f"DATA_READ_BY names modules that no longer read files beside themselves: {stale}"
    assert all((ROOT / d).exists() for d in claimed), "DATA_READ_BY names a file that is gone"


# A tiny project to show the checker fails both ways and follows every kind of import.
# Each module holds a statement that runs, so none passes as a code-less file.
CODE = "import os\nSEP = os.sep\n"
FAKE = {
    "stages/__init__.py": '"""Stages."""\n',
    "stages/run_a.py": "from semilens.a import work\n",
    "src/semilens/__init__.py": '"""Fake."""\n__version__ = "0"\n',
    "src/semilens/config.py": CODE,
    "src/semilens/a.py": (
        "from . import b\n"
        "from semilens import config\n"
        "def work():\n"
        "    from semilens.pkg import c  # lazy\n"
        "    import importlib\n"
        "    importlib.import_module('semilens.d')\n"
    ),
    "src/semilens/b.py": CODE,
    "src/semilens/pkg/__init__.py": '"""Package."""\n',
    "src/semilens/pkg/c.py": "from ..e import Y\n",
    "src/semilens/d.py": CODE,
    "src/semilens/e.py": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from semilens import f\nY = len(__name__)\n"
    ),
    "src/semilens/f.py": CODE,
    "src/semilens/unused.py": CODE,
}
COMPLETE = [
    "stages/run_a.py",
    "src/semilens/a.py",
    "src/semilens/b.py",
    "src/semilens/pkg/c.py",
    "src/semilens/d.py",
    "src/semilens/e.py",
]


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    for rel, text in FAKE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def _dvc(deps: list[str]) -> dict:
    return {"stages": {"run_a": {"cmd": "python -m stages.run_a", "deps": [*deps, "${paths.data}"]}}}


def test_checker_passes_the_complete_list_and_follows_every_kind_of_import(fake):
    # relative, lazy, importlib.import_module and a relative import two levels up are all
    # required; config.py, the code-less __init__s and the TYPE_CHECKING-only f.py are not
    assert check(_dvc(COMPLETE), fake) == {}


def test_checker_fails_on_a_missing_dep(fake):
    found = check(_dvc([d for d in COMPLETE if d != "src/semilens/pkg/c.py"]), fake)
    assert found["run_a"].missing == ["src/semilens/pkg/c.py"] and not found["run_a"].unused
    assert "missing (imported, not a dep): src/semilens/pkg/c.py" in describe(found)


def test_checker_fails_on_a_listed_module_not_imported(fake):
    found = check(_dvc([*COMPLETE, "src/semilens/unused.py"]), fake)
    assert found["run_a"].unused == ["src/semilens/unused.py"] and not found["run_a"].missing


def test_checker_requires_the_data_files_an_imported_module_reads(fake):
    (fake / "src/semilens/rubric").mkdir()
    (fake / "src/semilens/rubric/x.md").write_text("x")
    reads = {"src/semilens/b.py": ("src/semilens/rubric",)}
    assert check(_dvc(COMPLETE), fake, reads)["run_a"].missing == ["src/semilens/rubric"]
    assert check(_dvc([*COMPLETE, "src/semilens/rubric"]), fake, reads) == {}
    # listed but read by nothing the stage imports
    assert check(_dvc([*COMPLETE, "src/semilens/rubric"]), fake, {})["run_a"].unused == ["src/semilens/rubric"]


def test_checker_wants_the_script_first_and_names_dynamic_imports_it_cannot_follow(fake):
    found = check(_dvc([*COMPLETE[1:], COMPLETE[0]]), fake)
    assert found["run_a"].other == ["first dep should be its script stages/run_a.py"]
    (fake / "src/semilens/d.py").write_text("import importlib\nNAME = 'semilens.b'\nimportlib.import_module(NAME)\n")
    assert "dynamic import the test cannot follow" in check(_dvc(COMPLETE), fake)["run_a"].other[0]


def test_checker_names_config_py_when_it_is_listed(fake):
    found = check(_dvc([*COMPLETE, "src/semilens/config.py"]), fake)
    assert found["run_a"].other == ["src/semilens/config.py is deliberately not a code dep (see NOT_CODE_DEPS)"]


def test_a_family_matrix_entry_lists_its_own_family_only(fake):
    (fake / "src/semilens/vlm").mkdir()
    (fake / "src/semilens/vlm/__init__.py").write_text('"""VLM."""\n')
    (fake / "src/semilens/vlm/famA.py").write_text(CODE)
    (fake / "src/semilens/vlm/famB.py").write_text("from semilens import f\n")
    (fake / "src/semilens/vlm/families.py").write_text("from semilens.vlm import famA, famB\n")
    (fake / "stages/run_v.py").write_text("from semilens.vlm.families import famA\n")
    deps = ["stages/run_v.py", "src/semilens/vlm/families.py", "src/semilens/vlm/${item.family}.py"]
    stage = {"matrix": {"family": ["famA", "famB"]}, "cmd": "python -m stages.run_v ${item.family}", "deps": deps}
    dvc = {"stages": {"run_v": stage}}
    found = check(dvc, fake)
    # famB's own import (f.py) runs when families.py loads, so every entry needs it
    assert found["run_v@famA"].missing == ["src/semilens/f.py"]
    assert found["run_v@famB"].missing == ["src/semilens/f.py"]
    dvc["stages"]["run_v"]["deps"].append("src/semilens/f.py")
    assert check(dvc, fake) == {}


@pytest.mark.parametrize(
    ("stage", "module"),
    [("register_models", "semilens.vlm.register"), ("register_llm", "semilens.llm.register")],
)
def test_a_model_cards_params_hash_covers_only_params_its_stage_declares(stage, module):
    """A card states a hash of the params that shaped its model. When the hash covers a
    section the register stage does not declare, changing that section leaves dvc.lock
    clean while a fresh run writes another card."""
    import importlib

    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["params"]
    hashed = importlib.import_module(module).MODEL_SECTIONS
    assert set(hashed) <= set(declared), f"{stage} hashes {sorted(set(hashed) - set(declared))} undeclared"
