"""Answer a question about an image with any semilens VLM checkpoint folder (``semilens predict``).

The folder may be a base or merged checkpoint (loaded with the Auto classes), a LoRA
adapter folder (its base is read from ``adapter_config.json`` and the adapter applied with
PEFT), or a ``base/`` folder that references a real checkpoint through ``source.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from semilens.vlm.generate import greedy_answers
from semilens.vlm.prepare import resolve_checkpoint


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


def load_vlm(folder: Path):
    """(model, processor) for any VLM checkpoint folder semilens writes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder, base = locate_checkpoint(folder)
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), folder)
    else:
        model = AutoModelForImageTextToText.from_pretrained(folder)
    return model.eval(), AutoProcessor.from_pretrained(folder)


def predict(folder: Path, image: Path, question: str, max_new_tokens: int = 64, max_pixels: int | None = None) -> str:
    """The greedy answer; ValueError (one line, naming the file) for an unreadable image or
    one whose header claims more than ``max_pixels`` (ingest's cap; nothing is decoded)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    from semilens.config import IngestImagesConfig

    max_pixels = max_pixels or IngestImagesConfig().max_pixels
    try:
        # open() reads the header only; the cap below replaces Pillow's bomb warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(image)
        with opened:
            if opened.width * opened.height > max_pixels:
                raise ValueError(
                    f"{image}: header claims {opened.width}x{opened.height} = {opened.width * opened.height} pixels "
                    f"> max_pixels {max_pixels} (ingest_images.max_pixels; decompression-bomb guard, not decoded)"
                )
            picture = opened.convert("RGB")
    except Image.DecompressionBombError as exc:  # over twice Pillow's own limit: refused in open()
        raise ValueError(f"{image}: {exc} (max_pixels {max_pixels}; decompression-bomb guard, not decoded)") from exc
    except (FileNotFoundError, UnidentifiedImageError) as exc:
        raise ValueError(f"{image}: not a readable image ({exc.__class__.__name__})") from exc
    except OSError as exc:  # a truncated or corrupt file fails in convert(): name the file
        raise ValueError(f"{image}: not a readable image ({exc.__class__.__name__}: {exc})") from exc
    model, processor = load_vlm(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return greedy_answers(model, processor, [messages], [[picture]], max_new_tokens)[0]
