"""Audit: trace an artifact back to its raw files, verify artifacts against the pipeline's books.

Reads only what the pipeline already writes: ``dvc.lock`` (each stage's command, params and
the md5 of every dependency and output; from the working tree or any git revision), the
per-record provenance the stages keep (every image record, VQA row, page and chunk names
its source file, that file's sha256 and the page), and the MLflow registry's version tags
(``dvc.<role>.md5`` / ``.path`` / ``.stage``, written by the register stages).

    semilens trace models/qwen2_5_vl/adapter      # a path under models/ or data/
    semilens trace models:/semilens-qwen2_5_vl/3  # a registered version (or .../latest)
    semilens trace split_dataset --json           # a stage
    semilens verify                               # exit 1 when anything has drifted

Nothing here runs DVC: hashes are recomputed with ``semilens.lineage.dvc_md5`` (DVC 3's
own scheme), so the check works in a clone without a DVC cache and is the same code the
register stages trust. ``trace_tree`` and ``verify_lines`` render the two results for the
terminal; ``semilens.cli`` prints them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from semilens.config import Config
from semilens.io import read_json, read_jsonl, sha256_file
from semilens.lineage import LOCK_FILE, Hashed, LineageError, LockStage, dvc_md5, parse_lock, read_lock_text, run_git
from semilens.registry import describe_uri, flatten

MODEL_URI = "models:/"
# Dependencies that are code, not data: a stage's own script and the library it imports.
CODE_PREFIXES = ("src/", "stages/")


class AuditError(ValueError):
    """An artifact the audit cannot resolve (unknown path, stage or model version)."""


# ---------------------------------------------------------------- dvc.lock


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@dataclass
class Lock:
    stages: dict[str, LockStage]
    rev: str | None = None  # None: the working tree's dvc.lock

    def producer(self, path: str) -> tuple[LockStage, Hashed] | None:
        """The stage whose output is ``path`` or a folder holding it."""
        for stage in self.stages.values():
            for out in stage.outs:
                if _inside(path, out.path):
                    return stage, out
        return None

    def consumers(self, path: str) -> list[str]:
        """Stages that depend on ``path``, on a folder holding it, or on a file inside it."""
        return [
            s.name for s in self.stages.values() if any(_inside(path, d.path) or _inside(d.path, path) for d in s.deps)
        ]

    def downstream(self, paths: Iterable[str]) -> list[str]:
        """Every stage that (transitively) consumes one of ``paths``, in lock order."""
        seen: set[str] = set()
        frontier = list(paths)
        while frontier:
            path = frontier.pop()
            for name in self.consumers(path):
                if name not in seen:
                    seen.add(name)
                    frontier.extend(o.path for o in self.stages[name].outs)
        return [name for name in self.stages if name in seen]


def read_lock(root: Path = Path("."), rev: str | None = None) -> Lock:
    """``dvc.lock`` of the working tree, or as committed at git revision ``rev``."""
    if rev is None:
        path = Path(root) / LOCK_FILE
        if not path.is_file():
            raise LineageError(f"{path}: no dvc.lock; run the pipeline with `dvc repro`")
        return Lock(parse_lock(read_lock_text(path)), None)
    full = run_git(root, "rev-parse", "--verify", f"{rev}^{{commit}}")
    if full is None:
        raise AuditError(f"{rev!r} is no git revision here")
    text = run_git(root, "show", f"{full.strip()}:{LOCK_FILE}")
    if text is None:
        raise AuditError(f"git revision {rev!r} has no {LOCK_FILE}")
    return Lock(parse_lock(text), full.strip())


def lock_history(root: Path, limit: int = 200) -> list[str]:
    """Commits that changed dvc.lock, newest first."""
    out = run_git(root, "log", f"--max-count={limit}", "--format=%H", "--", LOCK_FILE)
    return out.split() if out else []


def stage_commits(root: Path, lock: Lock, history: list[str] | None = None) -> dict[str, str | None]:
    """For each stage, the commit that recorded its current lock entry (the oldest commit of
    the unbroken run, newest first, whose entry is the same); None when the entry is not
    committed yet (the stage ran after the last commit of dvc.lock)."""
    revs = lock_history(root) if history is None else history
    if lock.rev is not None:
        revs = revs[revs.index(lock.rev) :] if lock.rev in revs else [lock.rev, *revs]
    found: dict[str, str | None] = {name: None for name in lock.stages}
    open_ = set(lock.stages)
    for rev in revs:
        if not open_:
            break
        try:
            old = read_lock(root, rev)
        except AuditError:
            break
        for name in list(open_):
            if name in old.stages and old.stages[name].entry == lock.stages[name].entry:
                found[name] = rev
            else:
                open_.discard(name)
    return found


# ---------------------------------------------------------------- per-record provenance


@dataclass
class Sources:
    """Raw files behind an artifact, from the records that went into it."""

    images: dict[tuple[str, str, int], set[str]] = field(default_factory=dict)  # (source, sha, page) -> splits
    pages: dict[tuple[str, str], set[int]] = field(default_factory=dict)  # (source, sha) -> pages
    knowledge: set[str] = field(default_factory=set)  # knowledge-base files (git-tracked)
    generated: dict[str, int] = field(default_factory=dict)  # generator -> rows with no source file
    from_artifacts: set[str] = field(default_factory=set)  # the record files these came from
    # checkpoints a base was converted from (a GGUF a package ships): package, version, file, sha256
    checkpoints: list[dict[str, Any]] = field(default_factory=list)

    def add_image(self, source: str, sha: str, page: int, split: str) -> None:
        self.images.setdefault((source, sha, int(page)), set()).add(split)

    def add_pages(self, source: str, sha: str, pages: Iterable[int]) -> None:
        self.pages.setdefault((source, sha), set()).update(int(p) for p in pages)


def _vqa_records(folder: Path, sources: Sources, cfg: Config) -> None:
    import pandas as pd

    for split_file in sorted(folder.glob("*.parquet")):
        df = pd.read_parquet(split_file, columns=["source", "sha256", "page"]).drop_duplicates()
        for row in df.itertuples(index=False):
            sources.add_image(row.source, row.sha256, int(row.page), split_file.stem)


def _image_records(folder: Path, sources: Sources, cfg: Config) -> None:
    for r in read_jsonl(folder / "records.jsonl"):
        sources.add_image(r["source"], r["sha256"], int(r["page"]), "ingested")


def _page_records(folder: Path, sources: Sources, cfg: Config) -> None:
    for r in read_jsonl(folder / "pages.jsonl"):
        sources.add_pages(r["source"], r["sha256"], [r["page"]])


def _chunks(markdown: Path) -> Iterator[dict[str, Any]]:
    return read_jsonl(markdown / "chunks.jsonl")


def _markdown_records(folder: Path, sources: Sources, cfg: Config) -> None:
    for c in _chunks(folder):
        sources.add_pages(c["source"], c["sha256"], c["pages"])


def _knowledge_files(folder: Path) -> dict[str, str]:
    """group id -> its YAML file, as knowledge.py loads them."""
    out = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        group = (yaml.safe_load(path.read_text()) or {}).get("id")
        if group:
            out[str(group)] = path.as_posix()
    return out


def _instruction_records(folder: Path, sources: Sources, cfg: Config) -> None:
    import pandas as pd

    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise AuditError(f"{folder}: no instruction splits (*.parquet)")
    rows = pd.concat([pd.read_parquet(p, columns=["source"]) for p in files])
    refs = rows["source"].value_counts()
    root = folder.parents[len(Path(cfg.paths.instructions).parts) - 1]
    chunks = (
        {c["chunk_id"]: c for c in _chunks(root / cfg.paths.markdown)}
        if any(r.startswith("chunk:") for r in refs.index)
        else {}
    )
    groups = _knowledge_files(root / cfg.paths.knowledge)
    for ref, n in refs.items():
        kind, _, ident = str(ref).partition(":")
        if kind == "chunk":
            if ident not in chunks:
                raise AuditError(
                    f"{folder}: instruction source {ref!r} names no chunk in {cfg.paths.markdown}/chunks.jsonl"
                )
            c = chunks[ident]
            sources.add_pages(c["source"], c["sha256"], c["pages"])
        elif kind == "kb":
            group = ident.split("/", 1)[0]
            sources.knowledge.add(groups.get(group, f"{cfg.paths.knowledge}/?{group}"))
        else:
            sources.generated[str(ref)] = sources.generated.get(str(ref), 0) + int(n)


def _base_checkpoint(folder: Path, sources: Sources, cfg: Config) -> None:
    """The GGUF file a text base was converted from (``base/gguf.json``); the tiny preset and
    a referenced folder have none, and add nothing."""
    from semilens.checkpoints import GGUF_SOURCE_FILE

    if (folder / GGUF_SOURCE_FILE).is_file():
        sources.checkpoints.append(read_json(folder / GGUF_SOURCE_FILE))


def record_readers(cfg: Config) -> dict[str, Any]:
    """Artifacts (dvc.lock paths) whose files name their sources, and how to read them."""
    p = cfg.paths
    return {
        Path(p.vqa).as_posix(): _vqa_records,
        Path(p.interim_images).as_posix(): _image_records,
        Path(p.instructions).as_posix(): _instruction_records,
        Path(p.markdown).as_posix(): _markdown_records,
        Path(p.pages).as_posix(): _page_records,
        (Path(p.models) / "llm" / "base").as_posix(): _base_checkpoint,
    }


# ---------------------------------------------------------------- trace


def _dep_kind(path: str, lock: Lock) -> str:
    if lock.producer(path) is not None:
        return "artifact"
    return "code" if path.startswith(CODE_PREFIXES) else "input"


@dataclass
class Target:
    label: str
    kind: str  # stage | artifact | input | model
    roots: list[str]  # stages the trace starts from
    path: str | None = None
    model: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)


def _model_version(uri: str, name: str, version: str) -> Any:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise AuditError(
            f"no MLflow store at {uri[len('sqlite:///') :]} (run the pipeline, or set MLFLOW_TRACKING_URI)"
        )
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise AuditError(f"no registered model {name!r} in {uri}")
            return max(versions, key=lambda v: int(v.version))
        return client.get_model_version(name, version)
    except MlflowException as exc:
        raise AuditError(f"{MODEL_URI}{name}/{version}: {exc.message}") from None


def version_artifacts(tags: dict[str, str]) -> dict[str, Hashed]:
    """role -> (path, md5) from a version's ``dvc.<role>.*`` tags."""
    roles = {k[4:-4] for k in tags if k.startswith("dvc.") and k.endswith(".md5")}
    return {r: Hashed(tags[f"dvc.{r}.path"], tags[f"dvc.{r}.md5"]) for r in sorted(roles) if f"dvc.{r}.path" in tags}


def _lock_matching(root: Path, wanted: dict[str, Hashed]) -> Lock | None:
    """The newest dvc.lock (working tree, then history) whose outputs are the tagged ones."""

    def matches(lock: Lock) -> bool:
        outs = {o.path: o.md5 for s in lock.stages.values() for o in s.outs}
        return all(outs.get(h.path) == h.md5 for h in wanted.values())

    current = read_lock(root)
    if matches(current):
        return current
    for rev in lock_history(root):
        try:
            lock = read_lock(root, rev)
        except AuditError:
            continue  # a commit that deleted dvc.lock
        if matches(lock):
            return lock
    return None


def resolve(artifact: str, root: Path, cfg: Config, uri: str, rev: str | None = None) -> tuple[Target, Lock]:
    """What ARTIFACT names (a stage, a path, or ``models:/name/version``) and the lock to read."""
    if artifact.startswith(MODEL_URI):
        name, _, version = artifact[len(MODEL_URI) :].rpartition("/")
        if not name or not version:
            raise AuditError(f"{artifact!r}: expected models:/<name>/<version> (or .../latest)")
        mv = _model_version(uri, name, version)
        tags = dict(mv.tags)
        wanted = version_artifacts(tags)
        if not wanted:
            raise AuditError(
                f"{artifact}: version {mv.version} has no dvc.* lineage tags; it was not registered by semilens"
            )
        lock = read_lock(root, rev) if rev else _lock_matching(root, wanted)
        warnings = []
        if lock is None:
            lock = read_lock(root)
            warnings.append(
                f"no dvc.lock in the working tree or git history has this version's artifacts; "
                f"showing the current pipeline (tagged commit {tags.get('git.commit', '?')})"
            )
        roots = [
            s.name for s in lock.stages.values() if all(any(d.path == h.path for d in s.deps) for h in wanted.values())
        ]
        if not roots:
            roots = list(dict.fromkeys(tags.get(f"dvc.{r}.stage", "") for r in wanted if f"dvc.{r}.stage" in tags))
        roots = [r for r in roots if r in lock.stages]
        model = {
            "name": name,
            "version": int(mv.version),
            "run_id": mv.run_id,
            "source": mv.source,
            "git_commit": tags.get("git.commit"),
            "params_hash": tags.get("params_hash"),
            "artifacts": {r: {"path": h.path, "md5": h.md5} for r, h in wanted.items()},
        }
        return Target(artifact, "model", roots, model=model, warnings=warnings), lock

    lock = read_lock(root, rev)
    if artifact in lock.stages:
        return Target(artifact, "stage", [artifact]), lock
    path = Path(artifact)
    if path.is_absolute():
        try:
            path = path.resolve().relative_to(Path(root).resolve())
        except ValueError:
            raise AuditError(f"{artifact}: outside the project at {Path(root).resolve()}") from None
    rel = path.as_posix().rstrip("/")
    found = lock.producer(rel)
    if found is not None:
        return Target(artifact, "artifact", [found[0].name], path=rel), lock
    users = lock.consumers(rel)
    if users:
        return Target(
            artifact,
            "input",
            [],
            path=rel,
            warnings=[f"{rel} is a pipeline input (no stage makes it); used by {', '.join(users)}"],
        ), lock
    raise AuditError(
        f"{artifact!r} is no stage, no dvc.lock output or input, and not models:/<name>/<version>; "
        f"stages: {', '.join(lock.stages)}"
    )


def _closure(lock: Lock, roots: list[str]) -> list[str]:
    """The root stages and every stage upstream of them, roots first."""
    order: list[str] = []
    frontier = list(roots)
    while frontier:
        name = frontier.pop(0)
        if name in order:
            continue
        order.append(name)
        for dep in lock.stages[name].deps:
            found = lock.producer(dep.path)
            if found is not None:
                frontier.append(found[0].name)
    return order


def _nearest_records(lock: Lock, roots: list[str], start_paths: list[str], readers: dict[str, Any]) -> list[str]:
    """Record-bearing artifacts nearest the target on each branch: a model trained on the
    VQA dataset is traced through the dataset's rows, not every image ever ingested."""
    found: list[str] = []
    seen: set[str] = set()
    # a path target starts from itself; a stage or model from what its root stages read
    frontier = list(start_paths) or [d.path for r in roots for d in lock.stages[r].deps]
    while frontier:
        path = frontier.pop(0)
        if path in seen:
            continue
        seen.add(path)
        if path in readers:
            found.append(path)
            continue
        hit = lock.producer(path)
        if hit is not None:
            frontier.extend(d.path for d in hit[0].deps)
    return found


def _origin(lock: Lock, source: str) -> str:
    """'input' for a file the pipeline was given, else the stage that generated it."""
    hit = lock.producer(source)
    return "input" if hit is None else hit[0].name


def _file_status(root: Path, source: str, sha: str) -> str:
    path = Path(root) / source
    if not path.is_file():
        return "missing"
    return "ok" if sha256_file(path) == sha else "changed"


def _dep_entry(dep: Hashed, lock: Lock) -> dict[str, Any]:
    hit = lock.producer(dep.path)
    entry: dict[str, Any] = {"path": dep.path, "md5": dep.md5, "kind": _dep_kind(dep.path, lock)}
    if hit is not None:
        entry["stage"] = hit[0].name
    return entry


def trace(artifact: str, root: Path, cfg: Config, uri: str, rev: str | None = None) -> dict[str, Any]:
    """The whole chain behind ARTIFACT as plain data (what ``semilens trace --json`` prints)."""
    target, lock = resolve(artifact, root, cfg, uri, rev)
    order = _closure(lock, target.roots)
    commits = stage_commits(root, lock)
    stages = {}
    for name in order:
        s = lock.stages[name]
        stages[name] = {
            "cmd": s.cmd,
            "commit": commits.get(name),
            "params": s.params,
            "deps": [_dep_entry(d, lock) for d in s.deps],
            "outs": [{"path": o.path, "md5": o.md5} for o in s.outs],
        }
    inputs: dict[str, dict[str, Any]] = {}
    for name in order:
        for d in lock.stages[name].deps:
            if _dep_kind(d.path, lock) == "input":
                inputs.setdefault(d.path, {"path": d.path, "md5": d.md5, "used_by": []})["used_by"].append(name)
    if target.kind == "input" and target.path:
        inputs[target.path] = {"path": target.path, "md5": None, "used_by": lock.consumers(target.path)}

    readers = record_readers(cfg)
    start = [target.path] if target.path else []
    # a file inside a record-bearing folder (one split of the dataset) is traced through it
    start = [next((r for r in readers if _inside(p, r)), p) for p in start]
    split = Path(target.path).stem if target.path and start and target.path != start[0] else None
    record_paths = _nearest_records(lock, target.roots, start, readers)
    sources = Sources()
    for path in record_paths:
        folder = Path(root) / path
        if not folder.exists():
            target.warnings.append(f"{path} is not in the workspace (dvc pull / dvc repro); its records are not listed")
            continue
        locked = lock.producer(path)
        if locked is not None and dvc_md5(folder) != locked[1].md5:
            target.warnings.append(
                f"{path} in the workspace is not the one this dvc.lock ({target_lock_label(lock)}) records: "
                "the source files listed are the workspace's (check it out at that revision for the exact ones)"
            )
        try:
            readers[path](folder, sources, cfg)
        except (OSError, KeyError, ValueError) as exc:
            target.warnings.append(f"{path}: its records could not be read ({exc})")
            continue
        sources.from_artifacts.add(path)
    if split is not None and any(split in splits for splits in sources.images.values()):
        sources.images = {k: v for k, v in sources.images.items() if split in v}
    images = [
        {
            "source": src,
            "sha256": sha,
            "page": page,
            "splits": sorted(splits),
            "origin": _origin(lock, src),
            "status": _file_status(root, src, sha),
        }
        for (src, sha, page), splits in sorted(sources.images.items())
    ]
    pdfs = [
        {
            "source": src,
            "sha256": sha,
            "pages": sorted(pages),
            "origin": _origin(lock, src),
            "status": _file_status(root, src, sha),
        }
        for (src, sha), pages in sorted(sources.pages.items())
    ]
    return {
        "artifact": target.label,
        "kind": target.kind,
        "path": target.path,
        "lock": target_lock_label(lock),
        "model": target.model,
        "roots": target.roots,
        "stages": stages,
        "inputs": sorted(inputs.values(), key=lambda i: i["path"]),
        "records": {
            "from": sorted(sources.from_artifacts),
            "images": images,
            "pdfs": pdfs,
            "knowledge": sorted(sources.knowledge),
            "generated": dict(sorted(sources.generated.items())),
            "checkpoints": sources.checkpoints,
        },
        "warnings": target.warnings,
    }


def trace_tree(data: dict[str, Any]) -> Any:
    """What `semilens trace` prints: a rich tree of ``trace``'s result, each stage once
    (later references point back), its deps under it, then the raw files the records name."""
    from rich.markup import escape
    from rich.tree import Tree

    title = f"[bold]{escape(data['artifact'])}[/bold] ({data['kind']}; dvc.lock of the {data['lock']})"
    top = Tree(title)
    if data["model"]:
        m = data["model"]
        top.add(
            f"version {m['version']} of {escape(m['name'])}, run {m['run_id']}, git {str(m['git_commit'])[:12]}, params {m['params_hash']}"
        )
    for w in data["warnings"]:
        top.add(f"[yellow]warning[/yellow]: {escape(w)}")
    shown: set[str] = set()

    def add(node, name: str) -> None:
        s = data["stages"][name]
        commit = (s["commit"] or "not committed")[:12]
        branch = node.add(f"[cyan]{escape(name)}[/cyan]  `{escape(s['cmd'])}`  commit {commit}")
        if name in shown:
            branch.label = f"[cyan]{escape(name)}[/cyan] (shown above)"
            return
        shown.add(name)
        for values in (s["params"] or {}).values():
            for key, value in (values or {}).items():
                branch.add(f"param {escape(key)} = {escape(json.dumps(value))[:120]}")
        for d in s["deps"]:
            label = f"{escape(d['path'])}  md5 {d['md5']}"
            if d.get("stage"):
                add(branch.add(label), d["stage"])
            elif d["kind"] == "input":
                branch.add(f"[green]input[/green] {label}")
        code = [d for d in s["deps"] if d["kind"] == "code"]
        if code:
            branch.add(
                f"code: {len(code)} files ({', '.join(escape(d['path']) for d in code[:4])}{', ...' if len(code) > 4 else ''})"
            )

    for root in data["roots"]:
        add(top, root)
    rec = data["records"]
    if rec["from"]:
        files = top.add(f"[bold]source files[/bold] (from the records in {', '.join(rec['from'])})")
        for kind, rows in (("image", rec["images"]), ("pdf", rec["pdfs"])):
            if not rows:
                continue
            group = files.add(f"{len(rows)} {kind}{'s' if len(rows) != 1 else ''}")
            for r in rows:
                where = f"page {r['page']}" if kind == "image" else f"pages {','.join(map(str, r['pages']))}"
                extra = f" [{', '.join(r['splits'])}]" if kind == "image" else ""
                status = "" if r["status"] == "ok" else f" [red]{r['status']}[/red]"
                made = "" if r["origin"] == "input" else f" (made by {r['origin']})"
                group.add(f"{escape(r['source'])} {where} sha256 {r['sha256'][:16]}{extra}{made}{status}")
        if rec["knowledge"]:
            files.add(f"knowledge base: {', '.join(rec['knowledge'])}")
        for ref, n in rec["generated"].items():
            files.add(f"{escape(ref)}: {n} rows generated (no source file)")
        for c in rec.get("checkpoints", []):
            files.add(
                f"base checkpoint {escape(c['file'])} from the package {escape(c['package'])} {escape(c['version'])}, sha256 {c['sha256']}"
            )
    return top


def target_lock_label(lock: Lock) -> str:
    return "working tree" if lock.rev is None else f"git {lock.rev}"


# ---------------------------------------------------------------- verify


@dataclass
class Finding:
    kind: str  # changed-input | changed-code | drifted-output | missing-output | stale-stage | changed-params
    #            | stale-registration | unregistered | changed-file | missing-file
    #            | changed-registered-copy | missing-registered-copy
    path: str
    detail: str
    stages: list[str] = field(default_factory=list)  # stages it belongs to / is read by


class _Hasher:
    """dvc_md5 per path, computed once (a folder is read by several stages)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.known: dict[str, str | None] = {}

    def __call__(self, path: str) -> str | None:
        if path not in self.known:
            full = self.root / path
            self.known[path] = dvc_md5(full) if full.exists() else None
        return self.known[path]


def _recorded_sources(root: Path, lock: Lock, cfg: Config) -> dict[str, tuple[str, str]]:
    """source file -> (sha256 at ingest, record file) from the image and page records."""
    out: dict[str, tuple[str, str]] = {}
    for folder, name in ((cfg.paths.interim_images, "records.jsonl"), (cfg.paths.pages, "pages.jsonl")):
        for fname in (name, "quarantine.jsonl"):
            path = Path(root) / folder / fname
            if path.is_file():
                for r in read_jsonl(path):
                    if r.get("sha256") and r.get("source"):
                        out.setdefault(r["source"], (r["sha256"], (Path(folder) / fname).as_posix()))
    return out


def _changed_files(root: Path, folder: str, recorded: dict[str, tuple[str, str]]) -> list[Finding]:
    """Files under an input folder whose bytes differ from what the records saw."""
    found = []
    base = Path(root) / folder
    present = {p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file()} if base.is_dir() else set()
    for source, (sha, where) in sorted(recorded.items()):
        if not _inside(source, folder):
            continue
        if source not in present:
            found.append(Finding("missing-file", source, f"recorded in {where} (sha256 {sha[:12]}) but gone"))
        elif sha256_file(Path(root) / source) != sha:
            found.append(Finding("changed-file", source, f"sha256 differs from {where} ({sha[:12]})"))
    if not any(_inside(source, folder) for source in recorded):
        return found  # no per-file records for this input (the knowledge base, say)
    for source in sorted(present - set(recorded)):
        if Path(source).name not in (".gitkeep", "README.md"):
            found.append(Finding("new-file", source, "not in any record yet (added after the last run)"))
    return found


def _cached_listing(root: Path, md5: str) -> dict[str, str] | None:
    """relpath -> md5 of a folder output from DVC's cache manifest, when the cache has it."""
    if not md5.endswith(".dir"):
        return None
    manifest = Path(root) / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    if not manifest.is_file():
        return None
    return {e["relpath"]: e["md5"] for e in json.loads(manifest.read_text())}


def _output_files(root: Path, out: Hashed) -> str:
    listing = _cached_listing(root, out.md5)
    if listing is None:
        return ""
    from semilens.lineage import file_md5

    base = Path(root) / out.path
    now = {p.relative_to(base).as_posix(): p for p in base.rglob("*") if p.is_file()}
    changed = [rel for rel, md5 in listing.items() if rel in now and file_md5(now[rel]) != md5]
    gone = [rel for rel in listing if rel not in now]
    added = [rel for rel in now if rel not in listing]
    parts = [
        f"{label}: {', '.join(sorted(items)[:5])}{' ...' if len(items) > 5 else ''}"
        for label, items in (("changed", changed), ("missing", gone), ("added", added))
        if items
    ]
    return "; ".join(parts)


def _registry_versions(uri: str) -> list[Any] | str:
    """Every registered model version, or why the registry could not be read."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        return f"no MLflow store at {uri[len('sqlite:///') :]}"
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return list(client.search_model_versions())
    except MlflowException as exc:
        return f"MLflow registry at {uri} unreadable: {exc.message}"


def _local_artifacts(source: str) -> Path | None:
    """The local copy a version's ``source`` names: register() sets it to ``<run artifact
    uri>/<model artifact>``, beside the run's other copies. None for a store behind a
    server (mlflow-artifacts:, s3:, ...), whose copies are downloaded to be hashed."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(source)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "":
        return Path(source)
    return None


def _copy_md5(source: str, role: str, uri: str | None) -> str | None:
    """DVC md5 of the ``role`` copy beside a version's ``source``, None when it is gone. A
    copy in a server's store is downloaded to a scratch folder first: the bytes the
    registry hands out are what gets hashed."""
    local = _local_artifacts(source)
    if local is not None:
        copy = local.parent / role
        return dvc_md5(copy) if copy.exists() else None
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="semilens-verify-") as scratch:
        try:
            got = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{source.rsplit('/', 1)[0]}/{role}", dst_path=scratch, tracking_uri=uri
            )
        except (MlflowException, OSError):
            return None
        return dvc_md5(Path(got))


def _registered_copies(versions: list[Any], uri: str | None = None) -> tuple[list[Finding], int]:
    """Findings for the copies register() put in the MLflow artifact store whose bytes no
    longer hash to the ``dvc.<role>.md5`` tag of their version: the registry is what gets
    deployed, so a flipped byte there matters even when the workspace is intact. Each
    artifact named like a tagged role (adapter, gptq) is hashed with DVC's scheme, once
    per path however many versions share its run; copies in a tracking server's store
    (``uri``) are downloaded to be hashed. Returns (findings, copies hashed)."""
    found: list[Finding] = []
    hashed: dict[str, str | None] = {}
    for v in sorted(versions, key=lambda v: (v.name, int(v.version))):
        source = str(v.source or "")
        model_role = source.rstrip("/").rsplit("/", 1)[-1]
        local = _local_artifacts(source)
        # The copies beside the model's, listed once per version (a server's: when first needed).
        listed: set[str] | None = None
        if local is not None:
            listed = {p.name for p in local.parent.iterdir()} if local.parent.is_dir() else set()
        for role, tagged in version_artifacts(dict(v.tags)).items():
            if role != model_role:
                if listed is None:
                    listed = _listed_roles(source, uri)
                if role not in listed:
                    continue  # a role that is lineage only (dataset, evaluation), never copied
            where_copy = str(local.parent / role) if local is not None else f"{source.rsplit('/', 1)[0]}/{role}"
            if where_copy not in hashed:
                hashed[where_copy] = _copy_md5(source, role, uri)
            md5 = hashed[where_copy]
            where = f"{MODEL_URI}{v.name}/{v.version}"
            if md5 is None:
                found.append(
                    Finding("missing-registered-copy", where_copy, f"{role} of {where} is gone from the artifact store")
                )
            elif md5 != tagged.md5:
                found.append(
                    Finding(
                        "changed-registered-copy",
                        where_copy,
                        f"{role} of {where} hashes to {md5} but was registered as {tagged.md5} ({tagged.path})",
                    )
                )
    return found, len(hashed)


def _listed_roles(source: str, uri: str | None) -> set[str]:
    """The artifact folders beside a server-stored version's model copy."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        listing = mlflow.artifacts.list_artifacts(artifact_uri=source.rsplit("/", 1)[0], tracking_uri=uri)
    except (MlflowException, OSError):
        return set()
    return {Path(f.path).name for f in listing}


def verify(root: Path, cfg: Config, uri: str, params_file: Path = Path("params.yaml")) -> dict[str, Any]:
    """Recompute every hash dvc.lock records and compare; check the registry against it.

    In four steps, each adding findings and the paths they change: the outputs, the inputs
    and code, the params, then (once the stale stages are known) the registry."""
    root = Path(root)
    lock = read_lock(root)
    md5 = _Hasher(root)
    produced = {o.path: (s.name, o) for s in lock.stages.values() for o in s.outs}
    findings: list[Finding] = []
    changed_paths: list[str] = []
    for step in (
        _check_outputs(root, produced, md5),
        _check_deps(root, lock, cfg, produced, md5),
        _check_params(root, lock, params_file),
    ):
        findings.extend(step[0])
        changed_paths.extend(step[1])

    stale = set(lock.downstream(changed_paths)) | {
        f.stages[0] for f in findings if f.kind in ("changed-params", "stale-stage")
    }
    stale_stages = [name for name in lock.stages if name in stale]  # pipeline order
    affected_outputs = {o.path for n in stale_stages for o in lock.stages[n].outs} | set(changed_paths)

    registry_findings, models, registry_note, copies = _check_registry(uri, cfg, produced, affected_outputs)
    findings.extend(registry_findings)
    return {
        "ok": not findings,
        "lock": LOCK_FILE,
        "registry": registry_note or uri,
        "findings": [f.__dict__ for f in findings],
        "stale_stages": stale_stages,
        "affected_models": [m for m in models if m["affected_by"] or m["stale"]],
        "models": models,
        "checked": {"outputs": len(produced), "paths_hashed": len(md5.known), "registered_copies": copies},
    }


# Each check returns (findings, the paths they change) in the order verify reports them.
Produced = dict[str, tuple[str, Hashed]]  # output path -> (its stage, its lock entry)


def _check_outputs(root: Path, produced: Produced, md5: _Hasher) -> tuple[list[Finding], list[str]]:
    """Outputs: present and as recorded."""
    findings: list[Finding] = []
    changed_paths: list[str] = []
    for path, (stage, out) in produced.items():
        now = md5(path)
        if now is None:
            findings.append(Finding("missing-output", path, f"output of {stage} is not in the workspace", [stage]))
            changed_paths.append(path)
        elif now != out.md5:
            detail = f"md5 {now} but dvc.lock says {out.md5}"
            files = _output_files(root, out)
            findings.append(Finding("drifted-output", path, detail + (f" ({files})" if files else ""), [stage]))
            changed_paths.append(path)
    return findings, changed_paths


def _check_deps(
    root: Path, lock: Lock, cfg: Config, produced: Produced, md5: _Hasher
) -> tuple[list[Finding], list[str]]:
    """Inputs and code: as the stages that read them last saw them; a changed input folder
    names the files in it that changed."""
    findings: list[Finding] = []
    changed_paths: list[str] = []
    recorded = None
    by_dep: dict[str, list[str]] = {}
    for s in lock.stages.values():
        for d in s.deps:
            if d.path in produced or any(_inside(d.path, p) for p in produced):
                if d.path in produced and produced[d.path][1].md5 != d.md5:
                    findings.append(
                        Finding(
                            "stale-stage",
                            d.path,
                            f"{s.name} last ran on a different {d.path} than dvc.lock's output",
                            [s.name],
                        )
                    )
                    changed_paths.extend(o.path for o in s.outs)
                continue
            now = md5(d.path)
            if now == d.md5:
                continue
            by_dep.setdefault(d.path, []).append(s.name)
    for path, users in by_dep.items():
        kind = "changed-code" if path.startswith(CODE_PREFIXES) else "changed-input"
        now = md5(path)
        findings.append(Finding(kind, path, "deleted" if now is None else "md5 differs from dvc.lock", users))
        changed_paths.append(path)
        if kind == "changed-input":
            if recorded is None:
                recorded = _recorded_sources(root, lock, cfg)
            for f in _changed_files(root, path, recorded):
                f.stages = users
                findings.append(f)
    return findings, changed_paths


def _check_params(root: Path, lock: Lock, params_file: Path) -> tuple[list[Finding], list[str]]:
    """Params: the values each stage ran with."""
    findings: list[Finding] = []
    changed_paths: list[str] = []
    current = (yaml.safe_load((root / params_file).read_text()) or {}) if (root / params_file).is_file() else {}
    flat_now = flatten("", current)
    for s in lock.stages.values():
        ran = flatten("", s.params.get(params_file.name, {}) or {})
        diff = sorted(k for k, v in ran.items() if k not in flat_now or flat_now[k] != v)
        if diff:
            findings.append(
                Finding("changed-params", s.name, f"params changed since it ran: {', '.join(diff[:6])}", [s.name])
            )
            changed_paths.extend(o.path for o in s.outs)
    return findings, changed_paths


def _check_registry(
    uri: str, cfg: Config, produced: Produced, affected_outputs: set[str]
) -> tuple[list[Finding], list[dict[str, Any]], str | None, int]:
    """Registry: the latest version of each model must carry the lock's md5s, and each model
    output must be in some version. Returns (findings, the models, why the registry could
    not be read or None, registered copies checked)."""
    findings: list[Finding] = []
    versions = _registry_versions(uri)
    models: list[dict[str, Any]] = []
    registry_note = None
    tagged_md5s: set[str] = set()
    if isinstance(versions, str):
        registry_note = versions
        versions = []
    by_name: dict[str, list[Any]] = {}
    for v in versions:
        arts = version_artifacts(dict(v.tags))
        tagged_md5s.update(h.md5 for h in arts.values())
        if arts:
            by_name.setdefault(v.name, []).append(v)

    def mismatches(v: Any) -> list[str]:
        return [
            f"{h.path} (tagged {h.md5[:12]}, lock {produced[h.path][1].md5[:12] if h.path in produced else 'none'})"
            for h in version_artifacts(dict(v.tags)).values()
            if h.path not in produced or produced[h.path][1].md5 != h.md5
        ]

    for name, vs in sorted(by_name.items()):
        # Registration reuses a version whose lineage is already registered, so the version
        # made from the current lock need not be the newest: any version may match.
        newest_first = sorted(vs, key=lambda v: -int(v.version))
        current = next((v for v in newest_first if not mismatches(v)), None)
        v = current or newest_first[0]
        arts = version_artifacts(dict(v.tags))
        hit = sorted(h.path for h in arts.values() if h.path in affected_outputs)
        if current is None:
            findings.append(
                Finding(
                    "stale-registration",
                    f"{MODEL_URI}{name}/{v.version}",
                    "no version of this model was made from dvc.lock's artifacts; the newest: "
                    + "; ".join(mismatches(v)),
                )
            )
        models.append({"name": name, "version": int(v.version), "affected_by": hit, "stale": current is None})
    copy_findings, copies = _registered_copies(versions, uri)
    findings.extend(copy_findings)
    model_root = Path(cfg.paths.models).as_posix()
    for path, (stage, out) in produced.items():
        if _inside(path, model_root) and not path.endswith(".md") and out.md5 not in tagged_md5s:
            findings.append(
                Finding(
                    "unregistered",
                    path,
                    f"output of {stage} is in no registered model version"
                    + (f" ({registry_note})" if registry_note else ""),
                    [stage],
                )
            )
    return findings, models, registry_note, copies


def verify_lines(report: dict[str, Any]) -> list[str]:
    """What `semilens verify` prints (rich markup), one line each: every finding, the stale
    stages, the affected models, then the verdict."""
    from rich.markup import escape

    lines = []
    for f in report["findings"]:
        where = (
            f" (read by {', '.join(f['stages'])})"
            if f["stages"] and f["kind"] in ("changed-input", "changed-code", "changed-file")
            else ""
        )
        lines.append(f"[red]{f['kind']}[/red] {escape(f['path'])}: {escape(f['detail'])}{escape(where)}")
    if report["stale_stages"]:
        lines.append(f"stale stages (downstream): {', '.join(report['stale_stages'])}")
    for m in report["affected_models"]:
        why = f"built from {', '.join(m['affected_by'])}" if m["affected_by"] else "tags differ from dvc.lock"
        lines.append(f"affected model: models:/{m['name']}/{m['version']} ({escape(why)})")
    checked = report["checked"]
    verdict = "[green]ok[/green]" if report["ok"] else f"[red]{len(report['findings'])} finding(s)[/red]"
    lines.append(
        f"{verdict}: {checked['outputs']} outputs and {checked['paths_hashed']} paths hashed against dvc.lock; "
        f"{len(report['models'])} registered model(s) and {checked['registered_copies']} registered artifact copies "
        f"checked in {escape(describe_uri(report['registry']))}"
    )
    return lines
