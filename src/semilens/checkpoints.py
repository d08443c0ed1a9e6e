"""Checkpoint folders as semilens writes them, shared by the text (``llm/``) and vision
(``vlm/``) paths, ``semilens serve`` and ``semilens ask``.

Every checkpoint folder a stage writes is an ordinary Hugging Face folder plus, at most,
these files of ours: the resolved config of the stage that wrote it (``CONFIG_FILE``), a
``SOURCE_FILE`` in a ``base/`` that references a real checkpoint elsewhere instead of
copying its weights, and a ``GGUF_SOURCE_FILE`` naming the GGUF a base was read from.
Nothing here imports a model library: the text stages use it without pulling in the VLM
families.
"""

from __future__ import annotations

import json
from pathlib import Path

from semilens.io import read_json

SOURCE_FILE = "source.json"
CONFIG_FILE = "semilens_config.yaml"
GGUF_SOURCE_FILE = "gguf.json"  # not source.json: that one redirects loaders to a folder elsewhere


def resolve_checkpoint(folder: Path) -> Path:
    """The folder to load weights from: a real base is referenced, not copied."""
    source = Path(folder) / SOURCE_FILE
    if source.is_file():
        return Path(read_json(source)["path"])
    return Path(folder)


def locate_checkpoint(folder: Path) -> tuple[Path, Path | None]:
    """(the folder to load, the adapter's base folder or None) for any checkpoint folder
    semilens writes, VLM or text; raises FileNotFoundError naming what is missing.

    An adapter's base is the path PEFT recorded at training time, relative to the project
    root when the pipeline wrote it, so adapters load from the project root.
    """
    folder = resolve_checkpoint(Path(folder))
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file():
        base = Path(json.loads(adapter_config.read_text())["base_model_name_or_path"])
        if not (base / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder}: adapter's base {base} is not a local checkpoint folder "
                "(run from the project root, or use the merged folder)"
            )
        return folder, base
    if (folder / "config.json").is_file():
        return folder, None
    raise FileNotFoundError(f"{folder}: not a checkpoint folder (no config.json or adapter_config.json)")
