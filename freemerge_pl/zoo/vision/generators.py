"""Procedural image generators of the zoo: eight downstream tasks and a disjoint pre-training corpus.

Every image is 32×32 RGB uint8, drawn from a ``numpy.random.Generator`` (same seed ⇒ same bytes on one
machine). Shapes and glyphs are drawn on a 64×64 canvas and box-downsampled (anti-aliasing). Each task
exercises a different visual skill, so that fine-tuning on one moves the backbone in its own direction:

=============  =======  ==================================================================================
task           classes  skill
=============  =======  ==================================================================================
digits         10       printed digits on muted cluttered backgrounds with neighbours (SVHN-like)
letters        26       letters, upper or lower case, thick elastic strokes, white on black (EMNIST-like)
signs          12       sign shape × sign colour on clutter, variable light (GTSRB-like)
textures       10       periodic / stochastic texture families, random scale and colours (DTD-like)
counting       6        how many (1-6) small objects lie on a noisy background
orientation    8        angle bin (22.5° each) of one bar among clutter
layout         8        the spatial layout of the scene (splits, bands, centre, frame, quadrants)
handwritten    10       scikit-learn's bundled real handwritten digits, upsampled, light on dark, jittered
fashion        10       Fashion-MNIST, only when ``/usr/share/datasets/fashion-mnist`` is installed
=============  =======  ==================================================================================

The pre-training corpus (``freemerge_pl.zoo.vision.pretext.pretext_batch``) draws scenes of generic primitives (discs, boxes, triangles,
rings, bars, curves, stars, dot clusters) or, in half of the scenes, one of 64 fixed random "pseudo-glyphs"
(2-4 Bézier strokes each: stroke shapes, like a script nobody writes), over four background kinds, and labels
each scene with generic attributes (which primitives are present, the main object's type, hue and position,
the background kind, the pseudo-glyph's identity) plus a per-token map of which object covers each patch.
None of the downstream tasks' images can come out of it: it draws no digits or letters, signs, textures of
the task families, counted objects or layouts.
"""

from __future__ import annotations

import colorsys
import functools
import gzip
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

SIZE = 32
CANVAS = 64
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
HAS_FREETYPE = bool(features.check("freetype2"))


# ----------------------------------------------------------------------------------------------- helpers
def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _random_colour(rng: np.random.Generator, max_saturation: float = 1.0) -> np.ndarray:
    return _hsv(rng.random(), rng.uniform(0.0, max_saturation), rng.uniform(0.15, 1.0))


def _luma(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _contrasting_pair(rng: np.random.Generator, min_gap: float = 70.0) -> tuple[np.ndarray, np.ndarray]:
    while True:
        a, b = _random_colour(rng), _random_colour(rng)
        if abs(_luma(a) - _luma(b)) >= min_gap:
            return a, b


def _smooth_noise(rng: np.random.Generator, cells: int, size: int = CANVAS) -> np.ndarray:
    """Low-frequency noise in [0, 1] (a random ``cells``×``cells`` grid, bicubic upsampled)."""
    grid = Image.fromarray(rng.random((cells, cells)).astype(np.float32), mode="F")
    out = np.asarray(grid.resize((size, size), Image.BICUBIC), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def _background(rng: np.random.Generator, kind: str | None = None, max_saturation: float = 0.5) -> np.ndarray:
    """A CANVAS×CANVAS×3 float background (muted colours): flat, gradient or low-frequency colour noise."""
    kind = kind or ("flat", "gradient", "noise")[int(rng.integers(3))]
    a, b = _random_colour(rng, max_saturation), _random_colour(rng, max_saturation)
    if kind == "flat":
        return np.broadcast_to(a, (CANVAS, CANVAS, 3)).copy()
    if kind == "gradient":
        t = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32) / (CANVAS - 1) - 0.5
        w = np.clip(0.5 + xx * math.cos(t) + yy * math.sin(t), 0, 1)[..., None]
        return a * (1 - w) + b * w
    w = _smooth_noise(rng, int(rng.integers(2, 6)))[..., None]
    return a * (1 - w) + b * w


def _finish(img: np.ndarray, rng: np.random.Generator, noise: tuple[float, float] = (0.0, 10.0)) -> np.ndarray:
    """Downsample a CANVAS image to SIZE (box filter), add Gaussian noise, return uint8 [SIZE,SIZE,3]."""
    img = np.clip(img, 0, 255).astype(np.float32)
    if img.shape[0] != SIZE:
        f = img.shape[0] // SIZE
        img = img.reshape(SIZE, f, SIZE, f, 3).mean(axis=(1, 3))
    sigma = rng.uniform(*noise)
    if sigma > 0:
        img = img + rng.normal(0.0, sigma, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _blend(img: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    m = mask[..., None]
    return img * (1.0 - m) + colour * m


def _affine(mask: Image.Image, rng: np.random.Generator, rot: float, scale: tuple[float, float],
            shear: float, shift: float) -> Image.Image:
    """Random affine of an image about its centre (rotation in degrees, shift in pixels)."""
    a = math.radians(rng.uniform(-rot, rot))
    s = rng.uniform(*scale)
    sh = rng.uniform(-shear, shear)
    tx, ty = rng.uniform(-shift, shift, 2)
    fwd = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) @ np.array([[1, sh], [0, 1]]) * s
    inv = np.linalg.inv(fwd)
    c = np.array([mask.width / 2, mask.height / 2])
    off = c - inv @ (c + np.array([tx, ty]))
    data = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
    return mask.transform(mask.size, Image.AFFINE, data=data, resample=Image.BILINEAR)


@functools.lru_cache(maxsize=64)
def _font(size: int):
    return ImageFont.load_default(size=size) if HAS_FREETYPE else ImageFont.load_default()


def _glyph(ch: str, size: int, stroke: int = 0, offset: tuple[int, int] = (0, 0)) -> Image.Image:
    """Grey 'L' CANVAS×CANVAS mask with ``ch`` centred (plus ``offset``)."""
    im = Image.new("L", (CANVAS, CANVAS), 0)
    d = ImageDraw.Draw(im)
    font = _font(size)
    x0, y0, x1, y1 = d.textbbox((0, 0), ch, font=font, stroke_width=stroke)
    x = (CANVAS - (x1 - x0)) / 2 - x0 + offset[0]
    y = (CANVAS - (y1 - y0)) / 2 - y0 + offset[1]
    d.text((x, y), ch, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    return im


def _mask(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.float32) / 255.0


def _regular_polygon(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(rot + 2 * math.pi * i / n), cy + r * math.sin(rot + 2 * math.pi * i / n))
            for i in range(n)]


def _star(cx: float, cy: float, r: float, rot: float, points: int = 5) -> list[tuple[float, float]]:
    out = []
    for i in range(2 * points):
        rr = r if i % 2 == 0 else r * 0.45
        t = rot + math.pi * i / points
        out.append((cx + rr * math.cos(t), cy + rr * math.sin(t)))
    return out


def _clutter(img: np.ndarray, rng: np.random.Generator, n: int, alpha: float = 1.0,
             max_size: float = 14.0) -> np.ndarray:
    """Overlay ``n`` random rectangles / ellipses of random colours (generic scene clutter)."""
    for _ in range(n):
        im = Image.new("L", (CANVAS, CANVAS), 0)
        d = ImageDraw.Draw(im)
        x, y = rng.uniform(0, CANVAS, 2)
        w, h = rng.uniform(3, max_size, 2)
        box = (x - w, y - h, x + w, y + h)
        (d.rectangle if rng.random() < 0.5 else d.ellipse)(box, fill=255)
        img = _blend(img, _mask(im) * alpha, _random_colour(rng))
    return img


# ----------------------------------------------------------------------------------------------- tasks
def _digits(rng: np.random.Generator, label: int, ctx) -> np.ndarray:
    img = _clutter(_background(rng, max_saturation=0.35), rng, int(rng.integers(0, 3)), alpha=0.3)
    bg_luma = float(img.reshape(-1, 3).mean(0) @ [0.299, 0.587, 0.114])
    fg = _random_colour(rng, 0.5)
    while abs(_luma(fg) - bg_luma) < 90:
        fg = _random_colour(rng, 0.5)
    size = int(rng.integers(38, 50))
    stroke = int(rng.integers(0, 2))
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    gap = size * rng.uniform(0.75, 0.95)
    for k, off in ((str(label), 0.0), (str(int(rng.integers(10))), -gap), (str(int(rng.integers(10))), gap)):
        if off != 0.0 and rng.random() < 0.5:
            continue
        g = _glyph(k, size, stroke, (round(off), 0))
        canvas = Image.fromarray(np.maximum(np.asarray(canvas), np.asarray(g)))
    canvas = _affine(canvas, rng, rot=10, scale=(0.9, 1.1), shear=0.15, shift=3)
    return _finish(_blend(img, _mask(canvas), fg), rng, (0.0, 10.0))


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _letters(rng: np.random.Generator, label: int, ctx) -> np.ndarray:
    from scipy.ndimage import map_coordinates

    ch = _LETTERS[label] if rng.random() < 0.5 else _LETTERS[label].lower()
    g = _glyph(ch, int(rng.integers(36, 48)), int(rng.integers(1, 4)))
    g = _affine(g, rng, rot=15, scale=(0.8, 1.05), shear=0.3, shift=4)
    m = _mask(g)
    amp = rng.uniform(1.0, 3.0)
    dy = (_smooth_noise(rng, 4) - 0.5) * 2 * amp
    dx = (_smooth_noise(rng, 4) - 0.5) * 2 * amp
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)
    m = map_coordinates(m, [yy + dy, xx + dx], order=1, mode="constant")
    v = rng.uniform(180, 255)
    img = np.zeros((CANVAS, CANVAS, 3), np.float32) + rng.uniform(0, 40)
    return _finish(_blend(img, m, np.array([v, v, v], np.float32)), rng, (0.0, 8.0))


_SIGN_SHAPES = ("circle", "triangle", "inverted_triangle", "octagon")
_SIGN_COLOURS = {"red": 0.0, "blue": 0.6, "yellow": 0.14}


def _signs(rng: np.random.Generator, label: int, ctx) -> np.ndarray:
    shape = _SIGN_SHAPES[label // len(_SIGN_COLOURS)]
    hue = list(_SIGN_COLOURS.values())[label % len(_SIGN_COLOURS)]
    img = _clutter(_background(rng), rng, int(rng.integers(1, 5)), alpha=0.7)
    light = rng.uniform(0.45, 1.0)
    colour = _hsv(hue + rng.uniform(-0.025, 0.025), rng.uniform(0.75, 1.0), rng.uniform(0.7, 1.0)) * light
    white = np.full(3, 235.0 * light, np.float32)
    r = rng.uniform(11, 20)
    cx, cy = CANVAS / 2 + rng.uniform(-8, 8, 2)
    outer = Image.new("L", (CANVAS, CANVAS), 0)
    inner = Image.new("L", (CANVAS, CANVAS), 0)
    for im, rr in ((outer, r), (inner, r * rng.uniform(0.55, 0.7))):
        d = ImageDraw.Draw(im)
        if shape == "circle":
            d.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=255)
        elif shape == "triangle":
            d.polygon(_regular_polygon(cx, cy + rr * 0.15, rr * 1.1, 3, -math.pi / 2), fill=255)
        elif shape == "inverted_triangle":
            d.polygon(_regular_polygon(cx, cy - rr * 0.15, rr * 1.1, 3, math.pi / 2), fill=255)
        else:
            d.polygon(_regular_polygon(cx, cy, rr, 8, math.pi / 8), fill=255)
    img = _blend(img, _mask(outer), colour)
    img = _blend(img, _mask(inner), white)
    sym = Image.new("L", (CANVAS, CANVAS), 0)
    d = ImageDraw.Draw(sym)
    s = r * 0.3
    kind = int(rng.integers(4))
    if kind == 0:
        d.rectangle((cx - s, cy - s / 3, cx + s, cy + s / 3), fill=255)
    elif kind == 1:
        d.line((cx - s, cy + s, cx + s, cy - s), fill=255, width=2)
    elif kind == 2:
        d.ellipse((cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2), fill=255)
    img = _blend(img, _mask(sym), np.full(3, 20.0, np.float32))
    return _finish(img, rng, (0.0, 10.0))


_TEXTURES = ("stripes_horizontal", "stripes_vertical", "stripes_diagonal", "checker", "dots", "grid",
             "zigzag", "rings", "blotches", "speckle")


def _textures(rng: np.random.Generator, label: int, ctx) -> np.ndarray:
    kind = _TEXTURES[label]
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)
    t = math.radians(rng.uniform(-10, 10))
    u = xx * math.cos(t) + yy * math.sin(t)
    v = -xx * math.sin(t) + yy * math.cos(t)
    period = rng.uniform(6, 16)
    ph = rng.uniform(0, 2 * math.pi)
    k = 2 * math.pi / period
    if kind == "stripes_horizontal":
        w = np.sin(k * v + ph) > 0
    elif kind == "stripes_vertical":
        w = np.sin(k * u + ph) > 0
    elif kind == "stripes_diagonal":
        sgn = 1 if rng.random() < 0.5 else -1
        w = np.sin(k * (u + sgn * v) / math.sqrt(2) + ph) > 0
    elif kind == "checker":
        w = (np.sin(k * u + ph) > 0) ^ (np.sin(k * v + ph) > 0)
    elif kind == "dots":
        w = (np.cos(k * u + ph) + np.cos(k * v + ph)) > 1.2
    elif kind == "grid":
        w = (np.cos(k * u + ph) > 0.75) | (np.cos(k * v + ph) > 0.75)
    elif kind == "zigzag":
        tri = np.abs(((u / period) % 1.0) - 0.5) * period
        w = np.sin(k * (v + tri * 1.5) + ph) > 0
    elif kind == "rings":
        cx, cy = rng.uniform(0, CANVAS, 2)
        w = np.sin(k * np.hypot(xx - cx, yy - cy) + ph) > 0
    elif kind == "blotches":
        w = _smooth_noise(rng, int(rng.integers(4, 8))) > 0.5
    else:
        w = rng.random((CANVAS // 2, CANVAS // 2)).repeat(2, 0).repeat(2, 1) > 0.5
    a, b = _contrasting_pair(rng, 50)
    img = _blend(np.broadcast_to(a, (CANVAS, CANVAS, 3)).astype(np.float32), w.astype(np.float32), b)
    shade = 0.75 + 0.5 * _smooth_noise(rng, 3)[..., None]
    return _finish(img * shade, rng, (0.0, 12.0))


def _counting(rng: np.random.Generator, label: int, ctx) -> np.ndarray:
    n = label + 1
    img = _background(rng, ("flat", "noise")[int(rng.integers(2))])
    centres: list[tuple[float, float]] = []
    im = Image.new("L", (CANVAS, CANVAS), 0)
    d = ImageDraw.Draw(im)
    r = rng.uniform(3.5, 6.0)
    while len(centres) < n:
        c = tuple(rng.uniform(r + 2, CANVAS - r - 2, 2))
        if all(math.hypot(c[0] - p[0], c[1] - p[1]) > 2 * r + 3 for p in centres):
            centres.append(c)
    square = rng.random() < 0.5
    for cx, cy in centres:
        rr = r * rng.uniform(0.8, 1.2)
        (d.rectangle if square else d.ellipse)((cx - rr, cy - rr, cx + rr, cy + rr), fill=255)
    bg_luma = float(img.reshape(-1, 3).mean(0) @ [0.299, 0.587, 0.114])
    fg = _random_colour(rng)
    while abs(_luma(fg) - bg_luma) < 80:
        fg = _random_colour(rng)
    return _finish(_blend(img, _mask(im), fg), rng, (0.0, 12.0))


def _orientation(rng: np.random.Generator, label: int, ctx) -> np.ndarray:
    img = _clutter(_background(rng), rng, int(rng.integers(0, 4)), alpha=0.5, max_size=5)
    angle = math.radians(label * 22.5 + rng.uniform(-8, 8))
    length = rng.uniform(18, 28)
    cx, cy = CANVAS / 2 + rng.uniform(-10, 10, 2)
    dx, dy = math.cos(angle) * length, -math.sin(angle) * length
    im = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(im).line((cx - dx, cy - dy, cx + dx, cy + dy), fill=255, width=int(rng.integers(3, 7)))
    bg_luma = float(img.reshape(-1, 3).mean(0) @ [0.299, 0.587, 0.114])
    fg = _random_colour(rng)
    while abs(_luma(fg) - bg_luma) < 70:
        fg = _random_colour(rng)
    return _finish(_blend(img, _mask(im), fg), rng, (0.0, 12.0))


_LAYOUTS = ("split_horizontal", "split_vertical", "split_diagonal_up", "split_diagonal_down", "centre",
            "frame", "bands", "quadrants")


def _layout(rng: np.random.Generator, label: int, ctx) -> np.ndarray:
    kind = _LAYOUTS[label]
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32) / CANVAS - 0.5
    wob = (_smooth_noise(rng, 4) - 0.5) * 0.12
    o = rng.uniform(-0.12, 0.12)
    if kind == "split_horizontal":
        w = yy + wob > o
    elif kind == "split_vertical":
        w = xx + wob > o
    elif kind == "split_diagonal_up":
        w = (xx + yy) / math.sqrt(2) + wob > o
    elif kind == "split_diagonal_down":
        w = (xx - yy) / math.sqrt(2) + wob > o
    elif kind == "centre":
        w = np.hypot(xx - o / 2, yy + o / 2) + wob < rng.uniform(0.18, 0.3)
    elif kind == "frame":
        w = np.maximum(np.abs(xx), np.abs(yy)) + wob > rng.uniform(0.3, 0.38)
    elif kind == "bands":
        w = np.abs(yy + wob - o / 2) < rng.uniform(0.1, 0.18)
    else:
        w = (xx + wob > o) ^ (yy + wob > -o)
    a, b = _random_colour(rng), _random_colour(rng)
    while np.abs(a - b).sum() < 150:
        b = _random_colour(rng)
    img = _blend(np.broadcast_to(a, (CANVAS, CANVAS, 3)).astype(np.float32), w.astype(np.float32), b)
    img = img * (0.8 + 0.4 * _smooth_noise(rng, 3)[..., None])
    img = _clutter(img, rng, int(rng.integers(0, 3)), alpha=0.8, max_size=4)
    return _finish(img, rng, (0.0, 14.0))


def _sklearn_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def _handwritten(rng: np.random.Generator, label: int, ctx) -> np.ndarray:
    base = ctx.next_base(label, rng)
    side = int(rng.integers(36, 56))
    g = Image.fromarray((base * 255).astype(np.uint8), mode="L").resize((side, side), Image.BICUBIC)
    im = Image.new("L", (CANVAS, CANVAS), 0)
    im.paste(g, ((CANVAS - side) // 2, (CANVAS - side) // 2))
    im = _affine(im, rng, rot=10, scale=(0.95, 1.05), shear=0.1, shift=5)
    img = np.full((CANVAS, CANVAS, 3), rng.uniform(0, 50), np.float32)
    return _finish(_blend(img, _mask(im), np.full(3, rng.uniform(190, 255), np.float32)), rng, (0.0, 10.0))


def _read_idx(path: Path) -> np.ndarray:
    if path.suffix == ".gz":
        with gzip.open(path) as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(stem: str) -> Path | None:
    for p in sorted(FASHION_DIR.rglob(f"{stem}*")):
        if p.name.startswith(stem) and ("idx" in p.name):
            return p
    return None


def fashion_available() -> bool:
    """Whether the Debian ``dataset-fashion-mnist`` files can be read (idx format, gzipped or not)."""
    if not FASHION_DIR.is_dir():
        return False
    return all(_find_idx(s) is not None for s in ("train-images", "train-labels", "t10k-images", "t10k-labels"))


def _fashion_source(part: str):
    prefix = "train" if part == "train" else "t10k"
    x = _read_idx(_find_idx(f"{prefix}-images")).astype(np.float32) / 255.0
    y = _read_idx(_find_idx(f"{prefix}-labels")).astype(np.int64)
    return x, y


def _fashion(rng: np.random.Generator, label: int, ctx) -> np.ndarray:
    base = ctx.next_base(label, rng)
    g = Image.fromarray((base * 255).astype(np.uint8), mode="L").resize((56, 56), Image.BICUBIC)
    im = Image.new("L", (CANVAS, CANVAS), 0)
    im.paste(g, (4, 4))
    im = _affine(im, rng, rot=5, scale=(0.95, 1.05), shear=0.05, shift=3)
    img = np.full((CANVAS, CANVAS, 3), rng.uniform(0, 50), np.float32)
    return _finish(_blend(img, _mask(im), np.full(3, rng.uniform(190, 255), np.float32)), rng, (0.0, 6.0))


# ----------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class TaskSpec:
    """One downstream task: its name, class names and per-sample generator."""

    name: str
    class_names: tuple[str, ...]
    sample: Callable
    source: Callable | None = None  # real-image source: part ("train" | "test") -> (images, labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _digits_source(part: str):
    x, y = _sklearn_digits()
    return x, y  # split into disjoint parts by _BasePool


TASKS: dict[str, TaskSpec] = {
    "digits": TaskSpec("digits", tuple(str(i) for i in range(10)), _digits),
    "letters": TaskSpec("letters", tuple(_LETTERS), _letters),
    "signs": TaskSpec("signs", tuple(f"{c}_{s}" for s in _SIGN_SHAPES for c in _SIGN_COLOURS), _signs),
    "textures": TaskSpec("textures", _TEXTURES, _textures),
    "counting": TaskSpec("counting", tuple(str(i + 1) for i in range(6)), _counting),
    "orientation": TaskSpec("orientation", tuple(f"{i * 22.5:g}deg" for i in range(8)), _orientation),
    "layout": TaskSpec("layout", _LAYOUTS, _layout),
    "handwritten": TaskSpec("handwritten", tuple(str(i) for i in range(10)), _handwritten, _digits_source),
    "fashion": TaskSpec("fashion", ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                                    "sneaker", "bag", "ankle_boot"), _fashion, _fashion_source),
}
BASE_TASKS = ("digits", "letters", "signs", "textures", "counting", "orientation", "layout", "handwritten")


def available_tasks() -> list[str]:
    """The downstream tasks in their fixed order (Fashion-MNIST appended when it is installed)."""
    return list(BASE_TASKS) + (["fashion"] if fashion_available() else [])


class _BasePool:
    """Disjoint per-split pools of real source images, cycled per class in a seeded order."""

    def __init__(self, spec: TaskSpec, split: str, seed: int):
        if spec.name == "fashion":
            x, y = spec.source("test" if split == "test" else "train")
            keep = np.arange(len(y))
            if split != "test":  # train and router share the official train part; split it disjointly
                perm = np.random.default_rng([seed, 7]).permutation(len(y))
                cut = len(y) // 10
                keep = np.sort(perm[:cut] if split == "router" else perm[cut:])
        else:
            x, y = spec.source(split)
            # de-duplicate the raw images, then a stratified split of the unique ones: 70/10/20
            _, first = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)
            first = np.sort(first)
            parts = {"train": [], "router": [], "test": []}
            r = np.random.default_rng([seed, 11])
            for c in np.unique(y):
                idx = first[y[first] == c]
                idx = idx[r.permutation(len(idx))]
                a, b = round(0.7 * len(idx)), round(0.8 * len(idx))
                parts["train"].append(idx[:a])
                parts["router"].append(idx[a:b])
                parts["test"].append(idx[b:])
            keep = np.sort(np.concatenate(parts[split]))
        self.x, self.y = x[keep], y[keep]
        self.by_class = {int(c): np.flatnonzero(self.y == c) for c in np.unique(self.y)}
        self.cursor = {c: 0 for c in self.by_class}
        self.order = {c: idx.copy() for c, idx in self.by_class.items()}

    def next_base(self, label: int, rng: np.random.Generator) -> np.ndarray:
        c = self.cursor[label]
        if c % len(self.order[label]) == 0:
            self.order[label] = self.by_class[label][rng.permutation(len(self.by_class[label]))]
        self.cursor[label] = c + 1
        return self.x[self.order[label][c % len(self.order[label])]]


SPLITS = ("train", "router", "test")


def row_hash(image: np.ndarray) -> bytes:
    """Content hash of one image (any layout); used to keep the splits disjoint."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest()


def generate_split(task: str, split: str, n: int, seed: int, exclude: set[bytes] | None = None,
                   progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` class-balanced samples (counts differ by at most one) of ``task``: uint8 [n,3,32,32], int64 [n].

    Rows whose content hash is in ``exclude`` (the other splits) or repeats within the split are redrawn.
    ``progress(1)`` is called after each sample (it does not change the samples).
    """
    spec = TASKS[task]
    task_id = BASE_TASKS.index(task) if task in BASE_TASKS else 99
    rng = np.random.default_rng(np.random.SeedSequence([seed, task_id, SPLITS.index(split)]))
    labels = np.arange(n, dtype=np.int64) % spec.num_classes
    labels = labels[rng.permutation(n)]
    ctx = _BasePool(spec, split, seed) if spec.source is not None else None
    seen = set(exclude or ())
    images = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    for i, c in enumerate(labels):
        for _ in range(100):
            img = spec.sample(rng, int(c), ctx)
            h = row_hash(img.transpose(2, 0, 1))
            if h not in seen:
                break
        else:
            raise RuntimeError(f"task {task!r} split {split!r}: could not draw a new image of class {c}")
        seen.add(h)
        images[i] = img
        if progress is not None:
            progress(1)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels
