"""Etching mathematics problems with computed answers (the SemiKong recipe's maths set).

Each generator draws realistic inputs from a seeded RNG, computes the answer, and writes the
worked response an etch engineer would give: formula, substitution, result with its unit.
Every number the answer computes is written as ``<arithmetic> = <value>`` (a mean as the
sum of the sites over their count, a conversion as "x 60 s/min", a percentage as "/100
x"), so calculator decoding (semilens.llm.calculator) leaves the model only two jobs:
the formula and copying the question's numbers into it. A value stated without its
arithmetic ("= 5.67 min = 340 s") is one the model would have to compute itself.
The record keeps the inputs and the numeric answer, so an independent implementation (the
tests have one) can recompute every answer from the inputs alone.

Kinds and their difficulty: ``etch_rate``, ``selectivity`` (easy: one formula);
``anisotropy``, ``uniformity``, ``endpoint`` (medium: two steps or several numbers);
``arde``, ``overetch_loss``, ``loading`` (hard: a model plus unit handling).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MATERIALS = [
    ("SiO2", "photoresist", "CF4/CHF3"),
    ("polysilicon", "SiO2 hard mask", "HBr/Cl2"),
    ("Si3N4", "photoresist", "CH2F2/O2"),
    ("silicon", "SiO2 hard mask", "SF6/O2"),
    ("aluminium", "photoresist", "Cl2/BCl3"),
    ("low-k SiCOH", "TiN hard mask", "C4F8/Ar"),
]


@dataclass(frozen=True)
class Problem:
    kind: str
    difficulty: str
    question: str
    response: str
    answer: float
    unit: str
    inputs: dict[str, Any]
    formula: str


def _r(x: float, nd: int = 3) -> float:
    """Round to ``nd`` significant figures (answers are quoted as engineers quote them)."""
    if x == 0:
        return 0.0
    return round(x, nd - 1 - int(math.floor(math.log10(abs(x)))))


def _s(x: float, nd: int = 3) -> str:
    return f"{_r(x, nd):g}"


def etch_rate(rng: random.Random) -> Problem:
    film, _, chem = rng.choice(MATERIALS)
    before = rng.randrange(300, 2000, 10)
    removed = rng.randrange(50, before - 20, 5)
    t = rng.choice([30, 45, 60, 90, 120, 150, 180])
    rate = removed / (t / 60)
    q = (
        f"A {film} film measures {before} nm before etching in {chem} and {before - removed} nm after "
        f"{t} s. What is the etch rate in nm/min?"
    )
    resp = (
        # One "=" per computed value, so a calculator reading the model's arithmetic at each
        # "=" (semilens.llm.calculator) computes exactly the next number written here.
        f"Etch rate = removed thickness / time. Removed = {before} - {before - removed} = {removed} nm; "
        f"time = {t} s / 60 s/min = {_s(t / 60)} min; etch rate = {removed} nm / {_s(t / 60)} min = {_s(rate)} nm/min."
    )
    return Problem(
        "etch_rate",
        "easy",
        q,
        resp,
        _r(rate),
        "nm/min",
        {"before_nm": before, "after_nm": before - removed, "time_s": t},
        "ER = (d_before - d_after) / t",
    )


def selectivity(rng: random.Random) -> Problem:
    film, mask, chem = rng.choice(MATERIALS)
    er_film = rng.randrange(80, 900, 5)
    er_mask = rng.randrange(5, max(6, er_film // 2), 1)
    s = er_film / er_mask
    q = (
        f"In a {chem} etch, {film} etches at {er_film} nm/min and the {mask} at {er_mask} nm/min. "
        f"What is the {film}-to-mask selectivity?"
    )
    resp = f"Selectivity = ER_film / ER_mask = {er_film} / {er_mask} = {_s(s)}:1."
    return Problem(
        "selectivity", "easy", q, resp, _r(s), "", {"er_film": er_film, "er_mask": er_mask}, "S = ER_film / ER_mask"
    )


def anisotropy(rng: random.Random) -> Problem:
    depth = rng.randrange(200, 3000, 10)
    undercut = rng.randrange(5, depth // 4, 1)
    t = rng.choice([60, 90, 120, 180, 240])
    a = 1 - undercut / depth
    q = (
        f"A trench etched for {t} s reaches {depth} nm depth with {undercut} nm of lateral undercut "
        "under the mask edge on each side. What is the degree of anisotropy?"
    )
    resp = (
        f"Vertical rate = {depth} nm / {t} s and lateral rate = {undercut} nm / {t} s; the time cancels, so "
        f"A = 1 - ER_lateral / ER_vertical = 1 - {undercut} / {depth} = {_s(a, 3)}. "
        f"{'Close to 1: a highly anisotropic (directional) etch.' if a > 0.9 else 'Well below 1: noticeable isotropic component; raise ion energy or sidewall passivation.'}"
    )
    return Problem(
        "anisotropy",
        "medium",
        q,
        resp,
        _r(a, 3),
        "",
        {"depth_nm": depth, "undercut_nm": undercut, "time_s": t},
        "A = 1 - ER_lateral / ER_vertical",
    )


def uniformity(rng: random.Random) -> Problem:
    n = rng.choice([5, 9])
    mean0 = rng.randrange(150, 600, 5)
    sites = [round(mean0 * (1 + rng.uniform(-0.06, 0.06)), 1) for _ in range(n)]
    mean = sum(sites) / n
    nu = (max(sites) - min(sites)) / (2 * mean) * 100
    q = (
        f"Etch rates measured at {n} sites across a wafer (nm/min): {', '.join(f'{x:g}' for x in sites)}. "
        "What is the within-wafer non-uniformity by the (max - min) / (2 x mean) definition, in percent?"
    )
    resp = (
        f"Mean = ({' + '.join(f'{x:g}' for x in sites)}) / {n} = {_s(mean, 4)} nm/min; "
        f"max = {max(sites):g}, min = {min(sites):g}. "
        f"Non-uniformity = ({max(sites):g} - {min(sites):g}) / (2 x {_s(mean, 4)}) x 100% = {_s(nu)}%."
    )
    return Problem("uniformity", "medium", q, resp, _r(nu), "%", {"sites": sites}, "NU = (max - min) / (2 mean) x 100%")


def endpoint(rng: random.Random) -> Problem:
    film, _, chem = rng.choice(MATERIALS)
    thick = rng.randrange(100, 1500, 10)
    er = rng.randrange(60, 600, 5)
    oe = rng.choice([10, 15, 20, 30, 40, 50])
    t_clear = thick / er * 60
    total = t_clear * (1 + oe / 100)
    q = (
        f"{thick} nm of {film} is etched at {er} nm/min in {chem}. The recipe adds a {oe}% over-etch after "
        "the endpoint. What is the total etch time in seconds?"
    )
    resp = (
        f"Time to clear = {thick} nm / {er} nm/min x 60 s/min = {_s(t_clear)} s. "
        f"Total = {_s(t_clear)} s x (1 + {oe}/100) = {_s(total)} s."
    )
    return Problem(
        "endpoint",
        "medium",
        q,
        resp,
        _r(total),
        "s",
        {"thickness_nm": thick, "er_nm_min": er, "overetch_pct": oe},
        "t = d / ER x (1 + OE)",
    )


def overetch_loss(rng: random.Random) -> Problem:
    film, _, chem = rng.choice(MATERIALS)
    thick = rng.randrange(100, 1200, 10)
    er = rng.randrange(100, 600, 5)
    sel = rng.choice([5, 8, 10, 15, 20, 30, 50])
    oe = rng.choice([20, 30, 50, 100])
    t_oe = thick / er * (oe / 100)  # minutes
    loss = t_oe * er / sel
    q = (
        f"A {thick} nm {film} layer is cleared at {er} nm/min, then over-etched by {oe}% of the clearing time. "
        f"Selectivity to the underlying layer is {sel}:1. How much of the underlying layer is lost, in nm?"
    )
    resp = (
        f"Clearing time = {thick}/{er} = {_s(thick / er)} min; over-etch time = {oe}/100 x {_s(thick / er)} min = {_s(t_oe)} min. "
        f"Underlayer etch rate = {er}/{sel} = {_s(er / sel)} nm/min, so loss = {_s(t_oe)} min x {_s(er / sel)} nm/min = {_s(loss)} nm."
    )
    return Problem(
        "overetch_loss",
        "hard",
        q,
        resp,
        _r(loss),
        "nm",
        {"thickness_nm": thick, "er_nm_min": er, "selectivity": sel, "overetch_pct": oe},
        "loss = (d / ER) OE ER / S",
    )


def arde(rng: random.Random) -> Problem:
    er0 = rng.randrange(300, 1500, 10)
    k = rng.choice([0.02, 0.03, 0.04, 0.05])
    width = rng.choice([100, 150, 200, 250, 500])
    depth_target = rng.randrange(1000, 5000, 100)
    ar = depth_target / width
    er_at = er0 * (1 - k * ar)
    if 1 - k * ar < 0.3:
        # Near 1 - k AR = 0 the time runs away (ln of a tiny number): an answer that swings
        # with the third digit of AR is no test of method, so such trenches are redrawn.
        return arde(rng)
    # the rate falls as the trench deepens: dt = dh / (ER0 (1 - k h / w)), integrated over the depth
    t = width / (k * er0) * math.log(1 / (1 - k * ar))
    q = (
        f"An open-area etch rate of {er0} nm/min falls with aspect ratio as ER = ER0 (1 - {k} x AR). "
        f"How long does it take to etch a {width} nm wide trench to {depth_target} nm depth, in minutes?"
    )
    resp = (
        f"Final AR = {depth_target}/{width} = {_s(ar)}, where the rate has fallen to {er0} x (1 - {k} x {_s(ar)}) "
        f"= {_s(er_at)} nm/min. The rate "
        f"changes with depth h, so integrate dt = dh / (ER0 (1 - k h / w)): t = w / (k ER0) x ln(1 / (1 - k AR)) "
        f"= {width} / ({k} x {er0}) x ln(1 / (1 - {k} x {_s(ar)})) = {_s(t)} min."
    )
    return Problem(
        "arde",
        "hard",
        q,
        resp,
        _r(t),
        "min",
        {"er0_nm_min": er0, "k": k, "width_nm": width, "depth_nm": depth_target},
        "t = w / (k ER0) ln(1 / (1 - k AR))",
    )


def loading(rng: random.Random) -> Problem:
    er0 = rng.randrange(200, 1200, 10)
    phi = rng.choice([0.5, 1.0, 1.5, 2.0, 3.0])
    a1 = rng.choice([0.05, 0.1, 0.2])
    a2 = rng.choice([0.3, 0.5, 0.7])
    er1, er2 = er0 / (1 + phi * a1), er0 / (1 + phi * a2)
    drop = (1 - er2 / er1) * 100
    q = (
        f"Macro-loading follows ER = ER0 / (1 + {phi} x A), with A the exposed area fraction and ER0 = {er0} nm/min. "
        f"By how many percent does the etch rate drop when the exposed area goes from {a1:.0%} to {a2:.0%}?"
    )
    resp = (
        f"ER({a1:.0%}) = {er0} / (1 + {phi} x {a1}) = {_s(er1)} nm/min; ER({a2:.0%}) = {er0} / (1 + {phi} x {a2}) = {_s(er2)} nm/min. "
        # From the unrounded ratio: ER0 cancels, so no rounded intermediate feeds the answer.
        f"ER0 cancels in the ratio: drop = (1 - (1 + {phi} x {a1}) / (1 + {phi} x {a2})) x 100% = {_s(drop)}%."
    )
    return Problem(
        "loading",
        "hard",
        q,
        resp,
        _r(drop),
        "%",
        {"er0_nm_min": er0, "phi": phi, "area_1": a1, "area_2": a2},
        "ER = ER0 / (1 + phi A)",
    )


GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "etch_rate": etch_rate,
    "selectivity": selectivity,
    "anisotropy": anisotropy,
    "uniformity": uniformity,
    "endpoint": endpoint,
    "overetch_loss": overetch_loss,
    "arde": arde,
    "loading": loading,
}


def problems(n: int, seed: int, start: int = 0) -> list[Problem]:
    """Problems ``start`` to ``start + n - 1`` of the seed's sequence, cycling through the
    kinds, each from its own seeded RNG (so the first ``k`` never change as ``n`` grows)."""
    kinds = list(GENERATORS)
    return [GENERATORS[kinds[i % len(kinds)]](random.Random(f"{seed}:math:{i}")) for i in range(start, start + n)]
