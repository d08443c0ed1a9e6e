"""Answer a question about an image with any semilens VLM checkpoint folder (``semilens predict``).

The folder may be a base or merged checkpoint (loaded with the Auto classes), a LoRA
adapter folder (its base is read from ``adapter_config.json`` and the adapter applied with
PEFT), or a ``base/`` folder that references a real checkpoint through ``source.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from semilens.checkpoints import locate_checkpoint
from semilens.vlm.generate import greedy_answers


def load_vlm(folder: Path):
    """(model, processor) for any VLM checkpoint folder semilens writes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder, base = locate_checkpoint(folder)
    try:
        if base is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), folder)
        else:
            model = AutoModelForImageTextToText.from_pretrained(folder)
    except ValueError as exc:
        # A text checkpoint given to predict: transformers lists every VLM config class it
        # knows (a hundred names); say what went wrong instead, as `ask` does the other way.
        if "Unrecognized configuration class" not in str(exc):
            raise
        model_type = json.loads(((base or folder) / "config.json").read_text()).get("model_type")
        raise ValueError(
            f"{base or folder}: model_type {model_type!r} is not a vision-language model "
            "(give a VLM checkpoint, e.g. models/qwen2_5_vl/merged)"
        ) from None
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
