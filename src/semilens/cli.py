"""The ``semilens`` command: run a pipeline stage by name, show the resolved config.

    semilens stages                      list the stages
    semilens run STAGE [--dry-run]       run one stage (what `dvc repro` calls is the same code)
    semilens repro [TARGET...] [-j N]    dvc repro with N independent stages at once
    semilens config [SECTION]            print the resolved, validated params.yaml
    semilens predict IMAGE QUESTION      answer with a VLM checkpoint
    semilens ask QUESTION                answer with a text-model checkpoint
    semilens serve CHECKPOINT            serve a checkpoint over an OpenAI-compatible HTTP API
    semilens trace ARTIFACT [--json]     the chain behind a path, stage or models:/name/version
    semilens verify [--json]             recompute hashes against dvc.lock and the registry
    semilens review export | import CSV  expert ratings out to a CSV and back, with agreement
    semilens preset [NAME]               real-checkpoint presets: list, or one's settings and command

Run it from the project root (where params.yaml and stages/ live). Heavy libraries are
imported by the stage itself, so ``--help`` stays fast.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from collections.abc import Callable
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from semilens.config import DEFAULT_PARAMS, ConfigError, dump_config, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="semilens: run pipeline stages by name and inspect the resolved config (run from the project root).",
)
err = Console(stderr=True, soft_wrap=True)  # one-line errors, never wrapped


def available_stages(root: Path = Path(".")) -> list[str]:
    folder = root / "stages"
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def _answer(run: Callable[[], str]) -> None:
    """Print a model's answer (predict, ask). A bad input ends with one line on stderr and
    exit code 2, no traceback: ValueError, or OSError for transformers' "no weights / no
    tokenizer in this folder", whose text may span lines (joined here) and hold brackets
    (escaped, or rich would read them as markup)."""
    try:
        typer.echo(run())
    except (ValueError, OSError) as exc:
        err.print(f"[red]error[/red]: {escape(' '.join(str(exc).split()))}")
        raise typer.Exit(2) from exc


def _load(params: Path):
    try:
        return load_config(params)
    except ConfigError as exc:
        err.print(f"[red]config error[/red]: {exc}")
        raise typer.Exit(2) from exc


@app.command()
def stages() -> None:
    """List the pipeline stages that `semilens run` accepts."""
    for name in available_stages():
        typer.echo(name)


@app.command()
def config(
    section: str | None = typer.Argument(None, help="one section, e.g. synth_images"),
    params: Path = typer.Option(DEFAULT_PARAMS, help="params file"),
) -> None:
    """Print the resolved config (defaults filled in, validated)."""
    cfg = _load(params)
    if section is None:
        typer.echo(dump_config(cfg), nl=False)
        return
    if section not in type(cfg).model_fields:
        err.print(f"[red]unknown section[/red] {section!r}; known: {', '.join(type(cfg).model_fields)}")
        raise typer.Exit(2)
    typer.echo(dump_config(getattr(cfg, section)), nl=False)


@app.command()
def preset(
    name: str | None = typer.Argument(None, help="a preset in presets/, e.g. qwen2_5_vl-7b-instruct"),
    params: Path = typer.Option(DEFAULT_PARAMS, help="params file the preset is checked against"),
) -> None:
    """List the real-checkpoint presets, or show one: its settings and the `dvc exp run` for it."""
    from semilens.presets import PRESETS_DIR, apply, available, command

    try:
        presets = available(PRESETS_DIR)
        if name is None:
            for p in presets.values():
                typer.echo(f"{p.name}\t{p.family}\t{p.summary}")
            return
        if name not in presets:
            err.print(
                f"[red]unknown preset[/red] {name!r}; known: {', '.join(presets) or 'none (not in the project root?)'}"
            )
            raise typer.Exit(2)
        chosen = presets[name]
        apply(yaml.safe_load(params.read_text(encoding="utf-8")) or {}, chosen)  # refuses what does not validate
    except ConfigError as exc:
        err.print(f"[red]config error[/red]: {exc}")
        raise typer.Exit(2) from exc
    typer.echo(f"# {chosen.summary}; copy into {params.name}, or run it as an experiment:")
    typer.echo(yaml.safe_dump(chosen.params, sort_keys=False), nl=False)
    typer.echo(command(chosen))


@app.command()
def run(
    stage: str = typer.Argument(..., help="stage name, as in dvc.yaml"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and stop"),
    params: Path = typer.Option(
        DEFAULT_PARAMS,
        help="with --dry-run: another params file to validate and show; a stage itself always reads the "
        "project's params.yaml, the file DVC tracks",
    ),
) -> None:
    """Run one stage by name (the same entry point dvc.yaml calls)."""
    names = available_stages()
    # Matrix stages are named like dvc.yaml's: prepare_vlm@qwen2_5_vl runs
    # `python -m stages.prepare_vlm qwen2_5_vl`.
    stage, _, item = stage.partition("@")
    if stage not in names:
        err.print(f"[red]unknown stage[/red] {stage!r}; known: {', '.join(names) or 'none (not in the project root?)'}")
        raise typer.Exit(2)
    _check_matrix_item(stage, item, need_item=not dry_run)
    cfg = _load(params)
    if dry_run:
        # A stage reads `paths` and its own section; show exactly that.
        shown = {"paths": cfg.paths.model_dump(mode="json")}
        if stage in type(cfg).model_fields:
            shown[stage] = getattr(cfg, stage).model_dump(mode="json")
        typer.echo(f"# stage {stage}: python -m stages.{stage}")
        typer.echo(yaml.safe_dump(shown, sort_keys=False), nl=False)
        return
    if params != DEFAULT_PARAMS:
        err.print("[red]stages read params.yaml from the project root[/red]; use --dry-run with other files")
        raise typer.Exit(2)
    from semilens.stage_runner import StageLockError, dvc_stage_lock

    sys.path.insert(0, str(Path.cwd()))
    target = f"{stage}@{item}" if item else stage
    try:
        with dvc_stage_lock(target):
            sys.argv = [f"stages.{stage}", *([item] if item else [])]
            runpy.run_module(f"stages.{stage}", run_name="__main__", alter_sys=True)
    except StageLockError as exc:
        err.print(f"[red]error[/red]: {escape(str(exc))}")
        raise typer.Exit(2) from exc
    except (FileNotFoundError, ValueError) as exc:
        # What the stages raise for bad or missing input (the library's convention: one
        # message naming the file). A bug raising ValueError would hide behind this too,
        # so SEMILENS_TRACEBACK=1 re-raises; `dvc repro` runs the module directly and keeps
        # its traceback in any case.
        if os.environ.get("SEMILENS_TRACEBACK"):
            raise
        if isinstance(exc, FileNotFoundError) and exc.filename:
            why = f"{exc.strerror}: {exc.filename} (an input is missing; run the stages before it: dvc repro {target})"
        else:
            why = " ".join(str(exc).split())
        err.print(f"[red]error[/red]: {escape(target)}: {escape(why)} (SEMILENS_TRACEBACK=1 shows where)")
        raise typer.Exit(2) from exc


def _check_matrix_item(stage: str, item: str, need_item: bool = True, dvc_yaml: Path = Path("dvc.yaml")) -> None:
    """Refuse (exit 2, one line) an item a matrix stage does not have, a matrix stage run
    without one (a dry run may leave it out: the config it prints is shared), and an item given to a plain stage: `run prepare_vlm@gpt4v` would
    otherwise fail deep inside the stage with a traceback, and `--dry-run` pass it.
    The items are dvc.yaml's own, so `run` accepts exactly the names `dvc repro` does."""
    if not dvc_yaml.is_file():
        return  # outside a DVC project the stage itself checks its argument
    spec = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages", {}).get(stage) or {}
    matrix = spec.get("matrix") if isinstance(spec, dict) else None
    if not matrix:
        if item:
            err.print(f"[red]error[/red]: stage {stage!r} runs once, it takes no @{escape(item)}")
            raise typer.Exit(2)
        return
    # one matrix key (family) as in dvc.yaml; a templated or multi-key matrix is left to DVC
    if len(matrix) != 1 or not isinstance(next(iter(matrix.values())), list):
        return
    key, values = next(iter(matrix.items()))
    known = [str(v) for v in values]
    if not item:
        if not need_item:
            return
        err.print(
            f"[red]error[/red]: stage {stage!r} runs once per {key}; name one, e.g. {stage}@{known[0]} "
            f"(known {key} values: {', '.join(known)})"
        )
        raise typer.Exit(2)
    if item not in known:
        err.print(
            f"[red]error[/red]: unknown {key} {escape(repr(item))} for stage {stage!r}; known: {', '.join(known)}"
        )
        raise typer.Exit(2)


@app.command()
def repro(
    targets: list[str] | None = typer.Argument(None, help="stages (and all they depend on); default: every stage"),
    jobs: int = typer.Option(2, "--jobs", "-j", min=1, help="stages at once; each gets cores/jobs threads"),
    first: list[str] | None = typer.Option(
        None, help="start the stages this target needs before the rest (repeatable, in order)"
    ),
) -> None:
    """dvc repro, with up to JOBS independent stages running at once (one `dvc repro
    --single-item` each). Logs per stage under paths.logs/repro/, timings in paths.logs/repro.json."""
    from semilens.repro import ReproError
    from semilens.repro import repro as run_repro

    cfg = _load(DEFAULT_PARAMS)
    try:
        ok = run_repro(Path.cwd(), Path(cfg.paths.logs), targets or (), first or (), jobs, echo=typer.echo)
    except ReproError as exc:
        err.print(f"[red]error[/red]: {escape(str(exc))}")
        raise typer.Exit(2) from exc
    if not ok:
        raise typer.Exit(1)


@app.command()
def predict(
    image: Path = typer.Argument(..., help="an image file"),
    question: str = typer.Argument(..., help="what to ask about it"),
    checkpoint: Path = typer.Option(
        Path("models/qwen2_5_vl/merged"), help="any semilens VLM folder: base, merged or adapter"
    ),
    max_new_tokens: int = typer.Option(64, min=1),
    max_pixels: int | None = typer.Option(
        None,
        min=1,
        help="refuse images whose header claims more pixels (default: ingest_images.max_pixels of params.yaml)",
    ),
) -> None:
    """Answer a question about an image with a VLM checkpoint (greedy)."""
    from semilens.vlm.predict import predict as run_predict

    cap = max_pixels or _ingest_max_pixels()
    _answer(lambda: run_predict(checkpoint, image, question, max_new_tokens, max_pixels=cap))


def _ingest_max_pixels(params: Path = Path("params.yaml")) -> int:
    """The ingest stage's decompression-bomb cap: params.yaml's where there is one (run
    from the project root), else the config default, so predict and serve refuse what
    ingest refuses."""
    from semilens.config import IngestImagesConfig

    if params.is_file():
        return _load(params).ingest_images.max_pixels
    return IngestImagesConfig().max_pixels


@app.command()
def ask(
    question: str = typer.Argument(..., help="what to ask the text model"),
    checkpoint: Path = typer.Option(
        Path("models/llm/sft"), help="any semilens text folder: base, pretrained, sft, gptq or adapter"
    ),
    max_new_tokens: int = typer.Option(128, min=1),
    calculator: bool = typer.Option(
        False, help="compute the value after each '=' of the answer's arithmetic (etching maths; as the benchmark)"
    ),
) -> None:
    """Answer a question with a text-model checkpoint (greedy, through its chat template)."""
    from semilens.llm.ask import ask as run_ask

    _answer(lambda: run_ask(checkpoint, question, max_new_tokens, calculator))


@app.command()
def serve(
    checkpoint: Path = typer.Argument(
        ..., help="any semilens folder, text or VLM: base, pretrained, sft, gptq, merged or adapter"
    ),
    host: str = typer.Option("127.0.0.1", help="interface to bind; the default keeps the server to this machine"),
    port: int = typer.Option(8000, min=0, max=65535, help="0: any free port (the URL is printed)"),
    model_name: str | None = typer.Option(None, help="the model id clients send (default: CHECKPOINT as given)"),
    api_key_env: str | None = typer.Option(
        None, help="require `Authorization: Bearer <key>`, the key read from this environment variable (never printed)"
    ),
    max_request_bytes: int = typer.Option(20_000_000, min=1, help="larger request bodies get 413"),
    default_max_tokens: int = typer.Option(256, min=1, help="reply length when a request gives no max_tokens"),
    threads: int | None = typer.Option(None, min=1, help="torch threads (default: torch's choice)"),
    latency_ms: float = typer.Option(
        0.0, min=0, help="fixed delay before every /v1 answer (does not block other requests)"
    ),
    fault_rate: float = typer.Option(0.0, min=0, max=1, help="fraction of chat requests that get an injected fault"),
    fault_kinds: str = typer.Option("429,500,timeout,malformed", help="comma list of faults to draw from"),
    fault_seed: int = typer.Option(0, help="seed of the fault draw"),
    fault_hold_s: float = typer.Option(30.0, min=0, help="how long a `timeout` fault holds the reply"),
    fault_retry_after_s: int = typer.Option(1, min=0, help="Retry-After seconds of an injected 429"),
    max_tokens_cap: int = typer.Option(4096, min=1, help="requests asking for more max_tokens get 400"),
    context_tokens: int | None = typer.Option(
        None, min=2, help="prompt + max_tokens limit (default: the model's positions)"
    ),
    max_image_pixels: int | None = typer.Option(
        None,
        min=1,
        help="images claiming more pixels get 400, undecoded (default: ingest_images.max_pixels of params.yaml)",
    ),
    max_images: int = typer.Option(8, min=0, help="images per request"),
    max_json_depth: int = typer.Option(64, min=2, help="deeper-nested request bodies get 400"),
    max_in_flight: int = typer.Option(32, min=1, help="requests queued or generating; more get 429 with Retry-After"),
    busy_retry_after_s: int = typer.Option(1, min=0, help="Retry-After seconds of a 429 for a full queue"),
    max_batch_size: int = typer.Option(16, min=1, help="greedy requests answered together; 1: one at a time"),
    batch_window_ms: float = typer.Option(5.0, min=0, help="how long a request waits for others to batch with"),
) -> None:
    """Serve a checkpoint over an OpenAI-compatible API (/v1/models, /v1/chat/completions) until Ctrl-C."""
    import signal
    import threading

    from pydantic import ValidationError

    from semilens.serve import ServeOptions, make_app, serve_in_background

    key = None
    if api_key_env is not None:
        key = os.environ.get(api_key_env, "")
        if not key:
            err.print(
                f"[red]error[/red]: --api-key-env {escape(api_key_env)}: that environment variable is unset or empty"
            )
            raise typer.Exit(2)
    try:
        options = ServeOptions(
            model_name=model_name,
            api_key=key,
            max_request_bytes=max_request_bytes,
            default_max_tokens=default_max_tokens,
            threads=threads,
            latency_ms=latency_ms,
            fault_rate=fault_rate,
            fault_kinds=fault_kinds,
            fault_seed=fault_seed,
            fault_hold_s=fault_hold_s,
            fault_retry_after_s=fault_retry_after_s,
            max_tokens_cap=max_tokens_cap,
            context_tokens=context_tokens,
            max_image_pixels=max_image_pixels or _ingest_max_pixels(),
            max_images=max_images,
            max_json_depth=max_json_depth,
            max_in_flight=max_in_flight,
            busy_retry_after_s=busy_retry_after_s,
            max_batch_size=max_batch_size,
            batch_window_ms=batch_window_ms,
        )
        server = make_app(checkpoint, options)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
        )
        err.print(f"[red]error[/red]: {escape(problems)}")
        raise typer.Exit(2) from exc
    except (ValueError, OSError) as exc:  # as _answer: a bad folder is one line, exit 2
        err.print(f"[red]error[/red]: {escape(' '.join(str(exc).split()))}")
        raise typer.Exit(2) from exc

    # SIGTERM (docker stop, a test's terminate()) shuts down as cleanly as Ctrl-C does.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    kind = server.state.checkpoint.kind
    try:
        with serve_in_background(server, host, port, log_level="info") as url:
            auth = f", API key from ${api_key_env} required" if key else ""
            faults = f", faults {fault_rate:g} of {','.join(options.fault_kinds)}" if fault_rate else ""
            typer.echo(f"serving {server.state.model_name} ({kind}) at {url}{auth}{faults}")
            try:
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
    except RuntimeError as exc:  # the port is taken, say (uvicorn has logged why)
        err.print(f"[red]error[/red]: {escape(str(exc))}")
        raise typer.Exit(1) from exc


@app.command()
def trace(
    artifact: str = typer.Argument(
        ..., help="a path under models/ or data/, a stage name, or models:/NAME/VERSION (or /latest)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the chain as JSON"),
    rev: str | None = typer.Option(None, help="read dvc.lock as committed at this git revision"),
    params: Path = typer.Option(DEFAULT_PARAMS, help="params file"),
) -> None:
    """Print the chain behind an artifact: stages (command, params, commit), every
    dependency's md5 from dvc.lock, down to the raw images and PDF pages its records name."""
    from semilens.audit import AuditError, trace_tree
    from semilens.audit import trace as run_trace
    from semilens.lineage import LineageError
    from semilens.registry import tracking_uri

    cfg = _load(params)
    try:
        data = run_trace(artifact, Path("."), cfg, tracking_uri(cfg.paths.mlflow), rev)
    except (AuditError, LineageError) as exc:
        err.print(f"[red]error[/red]: {escape(str(exc))}")
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(data, indent=1, sort_keys=True))
        return
    Console(soft_wrap=True).print(trace_tree(data))


@app.command()
def verify(
    as_json: bool = typer.Option(False, "--json", help="print the findings as JSON"),
    params: Path = typer.Option(DEFAULT_PARAMS, help="params file"),
) -> None:
    """Recompute the hashes of the artifacts present, compare with dvc.lock and with the
    registered versions' tags; exit 1 naming every drifted, missing or unregistered one."""
    from semilens.audit import verify as run_verify
    from semilens.audit import verify_lines
    from semilens.lineage import LineageError
    from semilens.registry import tracking_uri

    cfg = _load(params)
    try:
        report = run_verify(Path("."), cfg, tracking_uri(cfg.paths.mlflow), params)
    except LineageError as exc:
        err.print(f"[red]error[/red]: {escape(str(exc))}")
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(report, indent=1, sort_keys=True))
    else:
        out = Console(soft_wrap=True)
        for line in verify_lines(report):
            out.print(line)
    if not report["ok"]:
        raise typer.Exit(1)


review_app = typer.Typer(no_args_is_help=True, help="Expert review: export a rating sheet, import it filled in.")
app.add_typer(review_app, name="review")


@review_app.command("export")
def review_export(
    n_llm: int = typer.Option(20, min=0, help="text-model answers to sample"),
    n_vlm: int = typer.Option(20, min=0, help="VLM captions and answers to sample"),
    seed: int = typer.Option(0, help="seed of the sample"),
    llm_model: str = typer.Option("sft", help="which text model's answers: base, pretrained, sft or gptq"),
    out: Path = typer.Option(Path("reviews"), help="folder for the sheet and its manifest"),
    params: Path = typer.Option(DEFAULT_PARAMS, help="params file"),
) -> None:
    """Write a CSV of model outputs for an expert to rate (1-5 per criterion)."""
    from semilens.review import ReviewError, export_review

    cfg = _load(params)
    try:
        done = export_review(cfg, out, n_llm, n_vlm, seed, llm_model)
    except ReviewError as exc:
        err.print(f"[red]error[/red]: {escape(str(exc))}")
        raise typer.Exit(2) from exc
    typer.echo(
        f"wrote {done['csv']}: {done['llm_items']} text answers (six expert criteria), "
        f"{done['vlm_items']} VLM outputs (correctness, relevance, clarity); scores 1-5, '-' where a criterion does not apply"
    )


@review_app.command("import")
def review_import(
    sheet: Path = typer.Argument(..., help="the filled CSV"),
    reviewer: str | None = typer.Option(
        None, help="the reviewer's name for every row (overrides the sheet's reviewer column)"
    ),
    reviews: Path = typer.Option(Path("reviews"), help="where the manifests and ratings.jsonl live"),
    no_dvc: bool = typer.Option(False, "--no-dvc", help="do not `dvc add` the ratings file"),
    params: Path = typer.Option(DEFAULT_PARAMS, help="params file"),
) -> None:
    """Read a filled sheet back: bad rows are refused with their row number, good ones stored
    in reviews/ratings.jsonl (versioned with `dvc add`), agreement in metrics/review.json."""
    from semilens.review import ReviewError, import_review

    cfg = _load(params)
    try:
        result, summary = import_review(cfg, sheet, reviews, reviewer, version=not no_dvc)
    except ReviewError as exc:
        err.print(f"[red]error[/red]: {escape(str(exc))}")
        raise typer.Exit(2) from exc
    for number, reason in result.rejected:
        err.print(f"[red]row {number} rejected[/red]: {escape(reason)}")
    typer.echo(
        f"{len(result.accepted)} ratings accepted, {len(result.rejected)} rows rejected, {result.skipped} left blank; "
        f"{summary['ratings']} ratings stored in {summary['store']}"
    )
    for kind, block in summary["agreement"].items():
        for name, c in block["criteria"].items():
            if c["rated"]:
                typer.echo(
                    f"  {kind} {name}: expert mean {c['expert_mean']}, {c['paired']} paired with the machine, "
                    f"Spearman {c['spearman']}, weighted kappa {c['weighted_kappa']}"
                )
    if summary["versioned"] and not summary["versioned"].endswith(".dvc"):
        err.print(f"[yellow]note[/yellow]: {escape(summary['versioned'])}")
    if result.rejected:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
