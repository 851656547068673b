"""The zoo's pre-training corpus: scenes of generic primitives or pseudo-glyphs with attribute targets and a
per-patch map of the object covering each patch (see ``freemerge_pl.zoo.vision.generators``' docstring)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from freemerge_pl.errors import ConfigError
from freemerge_pl.zoo.vision.generators import (
    CANVAS,
    _background,
    _blend,
    _finish,
    _hsv,
    _luma,
    _mask,
    _random_colour,
    _regular_polygon,
    _star,
)

PRIMITIVES = ("disc", "box", "triangle", "ring", "bar", "curve", "star", "dot_cluster")
BACKGROUNDS = ("flat", "gradient", "noise", "speckle")
HUE_BINS = 8
CELLS = 9
#: random stroke prototypes ("pseudo-glyphs": 2-4 Bézier strokes each; no alphabet's letters or digits)
PSEUDO_GLYPHS = 64
GLYPH = len(PRIMITIVES)  # the pseudo-glyph's index among the object types
#: output layout of the pretext targets: which primitives are present (multi-label) | main object's type
#: (8 primitives or a pseudo-glyph) | its hue bin | its 3×3 cell | background kind | pseudo-glyph id (or none)
PRETEXT_SLICES = {"presence": (0, 8), "type": (8, 17), "hue": (17, 25), "cell": (25, 34), "background": (34, 38),
                  "glyph": (38, 38 + PSEUDO_GLYPHS + 1)}
PRETEXT_DIM = 38 + PSEUDO_GLYPHS + 1
PATCH_GRID = 8
#: per-patch classes: the 8 primitives, pseudo-glyph stroke, background
PATCH_CLASSES = len(PRIMITIVES) + 2


def _bezier(pts: np.ndarray, n: int = 20) -> list[tuple[float, float]]:
    t = np.linspace(0, 1, n)[:, None]
    bez = (1 - t) ** 3 * pts[0] + 3 * (1 - t) ** 2 * t * pts[1] + 3 * (1 - t) * t ** 2 * pts[2] + t ** 3 * pts[3]
    return [tuple(p) for p in bez]


def _primitive(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, rng) -> None:
    rot = rng.uniform(0, 2 * math.pi)
    if kind == "disc":
        d.ellipse((cx - r, cy - r * rng.uniform(0.6, 1), cx + r, cy + r), fill=255)
    elif kind == "box":
        d.polygon(_regular_polygon(cx, cy, r, 4, rot), fill=255)
    elif kind == "triangle":
        d.polygon(_regular_polygon(cx, cy, r, 3, rot), fill=255)
    elif kind == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=max(2, int(r / 3)))
    elif kind == "bar":
        dx, dy = math.cos(rot) * r, math.sin(rot) * r
        d.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=255, width=max(2, int(r / 4)))
    elif kind == "curve":
        d.line(_bezier(rng.uniform(-r, r, (4, 2)) + (cx, cy)), fill=255, width=int(rng.integers(2, 5)),
               joint="curve")
    elif kind == "star":
        d.polygon(_star(cx, cy, r, rot), fill=255)
    else:
        for _ in range(int(rng.integers(4, 9))):
            px, py = rng.normal(0, r / 2, 2) + (cx, cy)
            d.ellipse((px - 1.5, py - 1.5, px + 1.5, py + 1.5), fill=255)


@functools.lru_cache(maxsize=4)
def _pseudo_glyph_table(seed: int) -> tuple[np.ndarray, ...]:
    """``PSEUDO_GLYPHS`` prototypes, each ``[strokes, 4, 2]`` Bézier control points in the unit square."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2000]))
    table = []
    for _ in range(PSEUDO_GLYPHS):
        strokes = []
        for _ in range(int(rng.integers(2, 5))):
            if rng.random() < 0.4:  # a straight stroke
                a, b = rng.uniform(0.1, 0.9, (2, 2))
                strokes.append(np.stack([a, a + (b - a) / 3, a + 2 * (b - a) / 3, b]))
            else:
                strokes.append(rng.uniform(0.1, 0.9, (4, 2)))
        table.append(np.stack(strokes))
    return tuple(table)


def _draw_pseudo_glyph(d: ImageDraw.ImageDraw, proto: np.ndarray, cx: float, cy: float, size: float,
                       rng: np.random.Generator) -> None:
    a = math.radians(rng.uniform(-15, 15))
    sh = rng.uniform(-0.2, 0.2)
    lin = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) @ np.array([[1, sh], [0, 1]])
    width = int(rng.integers(3, 7))
    for stroke in proto:
        pts = (stroke + rng.normal(0, 0.03, stroke.shape) - 0.5) * size
        d.line(_bezier(pts @ lin.T + (cx, cy)), fill=255, width=width, joint="curve")


def _pretext_scene(rng: np.random.Generator, glyphs: tuple[np.ndarray, ...], patch_grid: int = PATCH_GRID
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bg = int(rng.integers(len(BACKGROUNDS)))
    if BACKGROUNDS[bg] == "speckle":
        a, b = _random_colour(rng, 0.5), _random_colour(rng, 0.5)
        w = (rng.random((CANVAS, CANVAS)) < rng.uniform(0.1, 0.5)).astype(np.float32)[..., None]
        img = a * (1 - w) + b * w
    else:
        img = _background(rng, BACKGROUNDS[bg])
    bg_luma = float(img.reshape(-1, 3).mean(0) @ [0.299, 0.587, 0.114])
    target = np.zeros(PRETEXT_DIM, np.float32)
    glyph_scene = rng.random() < 0.5
    main = GLYPH if glyph_scene else int(rng.integers(len(PRIMITIVES)))
    glyph = int(rng.integers(PSEUDO_GLYPHS)) if glyph_scene else PSEUDO_GLYPHS
    hue = int(rng.integers(HUE_BINS))
    main_colour = _hsv((hue + rng.uniform(0.1, 0.9)) / HUE_BINS, rng.uniform(0.5, 1), rng.uniform(0.3, 1))
    for _ in range(20):
        if abs(_luma(main_colour) - bg_luma) >= 70:
            break
        main_colour = _hsv((hue + rng.uniform(0.1, 0.9)) / HUE_BINS, rng.uniform(0.5, 1), rng.uniform(0.3, 1))
    cx, cy = rng.uniform(20, CANVAS - 20, 2) if glyph_scene else rng.uniform(14, CANVAS - 14, 2)
    cell = int(cy // (CANVAS / 3)) * 3 + int(cx // (CANVAS / 3))
    others = []
    for _ in range(int(rng.integers(0, 3 if glyph_scene else 5))):
        others.append((int(rng.integers(len(PRIMITIVES))), *rng.uniform(0, CANVAS, 2), rng.uniform(3, 7),
                       _random_colour(rng)))
    owner = np.full((CANVAS, CANVAS), PATCH_CLASSES - 1, np.int64)
    for kind, x, y, r, colour in others + [(main, cx, cy, 0.0, main_colour)]:  # the main object last
        im = Image.new("L", (CANVAS, CANVAS), 0)
        if kind == GLYPH:
            _draw_pseudo_glyph(ImageDraw.Draw(im), glyphs[glyph], x, y, rng.uniform(30, 44), rng)
        else:
            _primitive(ImageDraw.Draw(im), PRIMITIVES[kind], x, y, r or rng.uniform(10, 16), rng)
            target[kind] = 1.0
        m = _mask(im)
        img = _blend(img, m, colour)
        owner[m > 0.5] = kind
    for name, index in (("type", main), ("hue", hue), ("cell", cell), ("background", bg), ("glyph", glyph)):
        target[PRETEXT_SLICES[name][0] + index] = 1.0
    g = patch_grid
    p = CANVAS // g
    blocks = owner.reshape(g, p, g, p).transpose(0, 2, 1, 3).reshape(g * g, p * p)
    counts = np.bincount((blocks + PATCH_CLASSES * np.arange(g * g)[:, None]).ravel(),
                         minlength=PATCH_CLASSES * g * g).reshape(-1, PATCH_CLASSES)[:, :-1]
    patch = np.where(counts.max(1) * 4 >= p * p, counts.argmax(1), PATCH_CLASSES - 1)
    return _finish(img, rng, (0.0, 10.0)), target, patch


def pretext_batch(n: int, seed: int, patch_grid: int = PATCH_GRID, progress: Callable[[int], None] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` pre-training scenes: uint8 [n,3,32,32], attribute targets float32 [n, PRETEXT_DIM] (laid out as
    ``PRETEXT_SLICES``) and per-patch labels int64 [n, patch_grid²] (the object covering most of each cell of
    a ``patch_grid``×``patch_grid`` grid over the image — the ViT's token grid — if it covers ≥ 1/4 of it,
    else background). ``progress(1)`` is called after each scene (it does not change the scenes)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1000]))
    glyphs = _pseudo_glyph_table(seed)
    if patch_grid < 1 or CANVAS % patch_grid:
        raise ConfigError(f"pretext_batch: patch_grid={patch_grid} must divide the {CANVAS}-pixel canvas")
    triples = []
    for _ in range(n):
        triples.append(_pretext_scene(rng, glyphs, patch_grid))
        if progress is not None:
            progress(1)
    x = np.stack([t[0] for t in triples]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), np.stack([t[1] for t in triples]), np.stack([t[2] for t in triples])


__all__ = ["PATCH_CLASSES", "PATCH_GRID", "PRETEXT_DIM", "PRETEXT_SLICES", "PRIMITIVES", "pretext_batch"]
