"""The generic image-text task a tiny VLM preset is pretrained on before any microscopy.

Two kinds of picture, half each: coloured shapes on a plain canvas (questions about
colour, shape, count and position) and textures (stripes, dots, lattices, checkerboards,
rings, scribbles, cells, blobs, plain; questions about the pattern, whether it is regular
and how dense it is). Textures are the everyday visual vocabulary a real VLM brings from
web-scale pretraining; without them the tiny vision tower never learns to tell one fine
pattern from another and the domain fine-tune has nothing to build on (measured: linear
probes on its features). No microscopy and no domain words: the class names, measurements
and instrument vocabulary come from the fine-tune alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
MAX_COUNT = 4


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    qa: list[tuple[str, str]]  # (question, answer) pairs about this image


def _draw(
    rnd: random.Random, colour: str, shape: str, count: int, size: int
) -> tuple[Image.Image, list[tuple[int, int]]]:
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


# pattern -> regular (periodic) or not
PATTERNS = {
    "stripes": True,
    "checkerboard": True,
    "lattice": True,
    "rings": True,
    "dots": False,
    "scribbles": False,
    "cells": False,
    "blobs": False,
    "plain": False,
}
TEXTURE_QUESTIONS = (
    "What pattern fills the picture?",
    "Is the pattern regular or irregular?",
    "How much of the picture is covered: little, half or most?",
)


def _grey_pair(rnd: random.Random) -> tuple[int, int]:
    low, high = rnd.randint(0, 90), rnd.randint(160, 255)
    return (low, high) if rnd.random() < 0.5 else (high, low)


def _texture_mask(rnd: random.Random, pattern: str, size: int) -> np.ndarray:
    """Boolean foreground of one texture, drawn with random scale and orientation."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    if pattern == "stripes":
        theta, period = rnd.uniform(0, np.pi), rnd.uniform(6, 20)
        return np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period) > 0
    if pattern == "checkerboard":
        cell = rnd.randint(6, 18)
        return ((xx // cell + yy // cell) % 2).astype(bool)
    if pattern == "lattice":
        step = rnd.uniform(10, 22)
        r = rnd.uniform(0.2, 0.35) * step
        return ((xx % step - step / 2) ** 2 + (yy % step - step / 2) ** 2) < r * r
    if pattern == "rings":
        cx, cy, period = rnd.uniform(0, size), rnd.uniform(0, size), rnd.uniform(6, 16)
        return np.sin(2 * np.pi * np.hypot(xx - cx, yy - cy) / period) > 0
    if pattern == "plain":
        return np.zeros((size, size), bool)
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    if pattern == "dots":
        for _ in range(rnd.randint(8, 45)):
            x, y, r = rnd.uniform(0, size), rnd.uniform(0, size), rnd.uniform(2, 6)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    elif pattern == "scribbles":
        for _ in range(rnd.randint(4, 14)):
            x, y, angle = rnd.uniform(0, size), rnd.uniform(0, size), rnd.uniform(0, 2 * np.pi)
            points = [(x, y)]
            for _ in range(rnd.randint(3, 8)):
                angle += rnd.uniform(-0.6, 0.6)
                x, y = x + 10 * np.cos(angle), y + 10 * np.sin(angle)
                points.append((x, y))
            draw.line(points, fill=255, width=rnd.randint(1, 3))
    elif pattern == "cells":
        seeds = np.array([[rnd.uniform(0, size), rnd.uniform(0, size)] for _ in range(rnd.randint(6, 30))])
        d = np.hypot(xx[..., None] - seeds[:, 0], yy[..., None] - seeds[:, 1])
        d.sort(axis=-1)
        return (d[..., 1] - d[..., 0]) < rnd.uniform(1.0, 2.5)
    elif pattern == "blobs":
        noise = Image.fromarray(
            (np.array([[rnd.random() for _ in range(size // 8)] for _ in range(size // 8)]) * 255).astype(np.uint8)
        )
        smooth = np.asarray(noise.resize((size, size), Image.BICUBIC), np.float32)
        return smooth > np.percentile(smooth, rnd.uniform(40, 75))
    return np.asarray(img) > 0


def _coverage_word(fraction: float) -> str:
    return "little" if fraction < 0.3 else "half" if fraction < 0.65 else "most"


def texture_sample(rnd: random.Random, size: int = 112) -> Sample:
    pattern = rnd.choice(sorted(PATTERNS))
    mask = _texture_mask(rnd, pattern, size)
    fg, bg = _grey_pair(rnd)
    tint = rnd.choice([(1.0, 1.0, 1.0), (1.0, 0.85, 0.7), (0.7, 0.85, 1.0)])  # grey or tinted
    grey = np.where(mask, fg, bg).astype(np.float32)
    rgb = np.clip(grey[..., None] * np.array(tint), 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB").filter(ImageFilter.GaussianBlur(rnd.uniform(0, 1.2)))
    covered = float(mask.mean()) if fg > bg else 1.0 - float(mask.mean())
    qa = [
        (TEXTURE_QUESTIONS[0], pattern),
        (TEXTURE_QUESTIONS[1], "regular" if PATTERNS[pattern] else "irregular"),
        (TEXTURE_QUESTIONS[2], _coverage_word(covered if pattern != "plain" else 0.0)),
    ]
    rnd.shuffle(qa)
    return Sample(img, qa)


def any_sample(rnd: random.Random, size: int = 112) -> Sample:
    """Shapes or textures, half each: the pretraining distribution."""
    return texture_sample(rnd, size) if rnd.random() < 0.5 else sample(rnd, size)


def phrasings() -> list[str]:
    """Every question and answer word of the task (for the tokenizer corpus)."""
    words = [q for q, _ in sample(random.Random(0)).qa] + list(TEXTURE_QUESTIONS)
    for colour in COLOURS:
        for shape in SHAPES:
            for n in range(1, MAX_COUNT + 1):
                words.append(f"{n} {colour} {shape}{'s' if n != 1 else ''}")
    return words + ["left", "right", "regular", "irregular", "little", "half", "most", *PATTERNS]


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
