"""The ``semilens`` command: run a pipeline stage by name, show the resolved config.

    semilens stages                      list the stages
    semilens run STAGE [--dry-run]       run one stage (what `dvc repro` calls is the same code)
    semilens config [SECTION]            print the resolved, validated params.yaml
    semilens predict IMAGE QUESTION      answer with a VLM checkpoint
    semilens ask QUESTION                answer with a text-model checkpoint
    semilens serve CHECKPOINT            serve a checkpoint over an OpenAI-compatible HTTP API

Run it from the project root (where params.yaml and stages/ live). Heavy libraries are
imported by the stage itself, so ``--help`` stays fast.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

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
    section: Optional[str] = typer.Argument(None, help="one section, e.g. synth_images"),
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
def run(
    stage: str = typer.Argument(..., help="stage name, as in dvc.yaml"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and stop"),
    params: Path = typer.Option(DEFAULT_PARAMS, help="params file"),
) -> None:
    """Run one stage by name (the same entry point dvc.yaml calls)."""
    names = available_stages()
    # Matrix stages are named like dvc.yaml's: prepare_vlm@qwen2_5_vl runs
    # `python -m stages.prepare_vlm qwen2_5_vl`.
    stage, _, item = stage.partition("@")
    if stage not in names:
        err.print(f"[red]unknown stage[/red] {stage!r}; known: {', '.join(names) or 'none (not in the project root?)'}")
        raise typer.Exit(2)
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
    sys.path.insert(0, str(Path.cwd()))
    sys.argv = [f"stages.{stage}", *([item] if item else [])]
    runpy.run_module(f"stages.{stage}", run_name="__main__", alter_sys=True)


@app.command()
def predict(
    image: Path = typer.Argument(..., help="an image file"),
    question: str = typer.Argument(..., help="what to ask about it"),
    checkpoint: Path = typer.Option(
        Path("models/qwen2_5_vl/merged"), help="any semilens VLM folder: base, merged or adapter"
    ),
    max_new_tokens: int = typer.Option(64, min=1),
) -> None:
    """Answer a question about an image with a VLM checkpoint (greedy)."""
    from semilens.vlm.predict import predict as run_predict

    _answer(lambda: run_predict(checkpoint, image, question, max_new_tokens))


@app.command()
def ask(
    question: str = typer.Argument(..., help="what to ask the text model"),
    checkpoint: Path = typer.Option(
        Path("models/llm/sft"), help="any semilens text folder: base, pretrained, sft, gptq or adapter"
    ),
    max_new_tokens: int = typer.Option(128, min=1),
) -> None:
    """Answer a question with a text-model checkpoint (greedy, through its chat template)."""
    from semilens.llm.ask import ask as run_ask

    _answer(lambda: run_ask(checkpoint, question, max_new_tokens))


@app.command()
def serve(
    checkpoint: Path = typer.Argument(..., help="any semilens folder, text or VLM: base, pretrained, sft, gptq, merged or adapter"),
    host: str = typer.Option("127.0.0.1", help="interface to bind; the default keeps the server to this machine"),
    port: int = typer.Option(8000, min=0, max=65535, help="0: any free port (the URL is printed)"),
    model_name: Optional[str] = typer.Option(None, help="the model id clients send (default: CHECKPOINT as given)"),
    api_key_env: Optional[str] = typer.Option(
        None, help="require `Authorization: Bearer <key>`, the key read from this environment variable (never printed)"
    ),
    max_request_bytes: int = typer.Option(20_000_000, min=1, help="larger request bodies get 413"),
    default_max_tokens: int = typer.Option(256, min=1, help="reply length when a request gives no max_tokens"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch threads (default: torch's choice)"),
    latency_ms: float = typer.Option(0.0, min=0, help="fixed delay before every /v1 answer (does not block other requests)"),
    fault_rate: float = typer.Option(0.0, min=0, max=1, help="fraction of chat requests that get an injected fault"),
    fault_kinds: str = typer.Option("429,500,timeout,malformed", help="comma list of faults to draw from"),
    fault_seed: int = typer.Option(0, help="seed of the fault draw"),
    fault_hold_s: float = typer.Option(30.0, min=0, help="how long a `timeout` fault holds the reply"),
    fault_retry_after_s: int = typer.Option(1, min=0, help="Retry-After seconds of an injected 429"),
) -> None:
    """Serve a checkpoint over an OpenAI-compatible API (/v1/models, /v1/chat/completions) until Ctrl-C."""
    import os
    import signal
    import threading

    from pydantic import ValidationError

    from semilens.serve import ServeOptions, make_app, serve_in_background

    key = None
    if api_key_env is not None:
        key = os.environ.get(api_key_env, "")
        if not key:
            err.print(f"[red]error[/red]: --api-key-env {escape(api_key_env)}: that environment variable is unset or empty")
            raise typer.Exit(2)
    try:
        options = ServeOptions(
            model_name=model_name, api_key=key, max_request_bytes=max_request_bytes, default_max_tokens=default_max_tokens,
            threads=threads, latency_ms=latency_ms, fault_rate=fault_rate, fault_kinds=fault_kinds, fault_seed=fault_seed,
            fault_hold_s=fault_hold_s, fault_retry_after_s=fault_retry_after_s,
        )
        server = make_app(checkpoint, options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
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


if __name__ == "__main__":
    app()
