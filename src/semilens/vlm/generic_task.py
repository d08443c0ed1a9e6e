"""The generic image-text task a tiny VLM preset is pretrained on before any microscopy.

Coloured shapes on a plain canvas with questions about colour, shape, count and position:
no microscopy, no domain words. It makes the tiny model play the part of a general VLM
(it has learned to look at the image and to answer in the chat format), so that whatever
it knows about SEM/TEM images afterwards comes from the domain fine-tune alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
MAX_COUNT = 4


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    qa: list[tuple[str, str]]  # (question, answer) pairs about this image


def _draw(rnd: random.Random, colour: str, shape: str, count: int, size: int) -> tuple[Image.Image, list[tuple[int, int]]]:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    r = max(4, size // 7)
    placed: list[tuple[int, int]] = []
    for _ in range(2000):
        if len(placed) == count:
            break
        x, y = rnd.randint(r + 2, size - r - 3), rnd.randint(r + 2, size - r - 3)
        if any((x - px) ** 2 + (y - py) ** 2 < (2 * r + 4) ** 2 for px, py in placed):
            continue
        placed.append((x, y))
        rgb = COLOURS[colour]
        if shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=rgb)
        elif shape == "square":
            draw.rectangle([x - r, y - r, x + r, y + r], fill=rgb)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=rgb)
    return img, placed


def sample(rnd: random.Random, size: int = 112) -> Sample:
    colour, shape = rnd.choice(sorted(COLOURS)), rnd.choice(SHAPES)
    count = rnd.randint(1, MAX_COUNT)
    img, placed = _draw(rnd, colour, shape, count, size)
    count = len(placed)
    plural = shape + ("s" if count != 1 else "")
    mean_x = sum(x for x, _ in placed) / count
    side = "left" if mean_x < size / 2 else "right"
    qa = [
        ("How many shapes are there?", str(count)),
        ("What colour are the shapes?", colour),
        ("Which shape is shown?", shape),
        ("Describe the image.", f"{count} {colour} {plural}"),
        ("Are the shapes mostly on the left or the right?", side),
    ]
    rnd.shuffle(qa)
    return Sample(img, qa)


def phrasings() -> list[str]:
    """Every question and answer word of the task (for the tokenizer corpus)."""
    words = [q for q, _ in sample(random.Random(0)).qa]
    for colour in COLOURS:
        for shape in SHAPES:
            for n in range(1, MAX_COUNT + 1):
                words.append(f"{n} {colour} {shape}{'s' if n != 1 else ''}")
    return words + ["left", "right"]


def conversation(s: Sample, turns: int | None = None) -> list[dict]:
    """A multi-turn chat about one image (several answers per image: more signal per step)."""
    messages: list[dict] = []
    for i, (q, a) in enumerate(s.qa[: turns or len(s.qa)]):
        content = [{"type": "text", "text": q}]
        if i == 0:
            content.insert(0, {"type": "image", "text": None})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return messages
