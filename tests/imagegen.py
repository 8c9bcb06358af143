"""Deterministic photo-like test images: layered scenes with texture, so CNN features behave as on photos.

No photos are committed with the tests; every image is drawn from a seed.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def scene(seed: int, size: tuple[int, int] = (480, 360)) -> Image.Image:
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    w, h = size
    # Sky and ground: two vertical gradients with a horizon at a random height.
    top = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    bottom = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    canvas = (top * (1 - t) + bottom * t) * np.ones((h, w, 3), dtype=np.float32)
    horizon = rng.randint(h // 3, 2 * h // 3)
    ground = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    canvas[horizon:] = canvas[horizon:] * 0.3 + ground * 0.7
    # Texture: smoothed noise at two scales, different per seed.
    for scale, amp in ((24, 30.0), (3, 8.0)):
        small = nrng.normal(0, 1, (h // scale + 1, w // scale + 1, 3))
        small = ((np.clip(small, -3, 3) + 3) * 42).astype(np.uint8)
        smooth = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        canvas += (np.asarray(smooth, dtype=np.float32) - 127.0) / 127.0 * amp
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(6, 14)):
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        x0, y0 = rng.randint(-40, w), rng.randint(-40, h)
        x1, y1 = x0 + rng.randint(20, w // 2), y0 + rng.randint(20, h // 2)
        kind = rng.choice(("ellipse", "rect", "poly", "poly", "lines"))
        if kind == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=colour, outline=(0, 0, 0), width=rng.randint(0, 4))
        elif kind == "rect":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif kind == "poly":
            pts = [(rng.randint(x0, x1), rng.randint(y0, y1)) for _ in range(rng.randint(3, 7))]
            draw.polygon(pts, fill=colour)
        else:
            for _ in range(rng.randint(5, 20)):
                draw.line(
                    (rng.randint(0, w), rng.randint(0, h), rng.randint(0, w), rng.randint(0, h)),
                    fill=colour,
                    width=rng.randint(1, 6),
                )
    return image.filter(ImageFilter.GaussianBlur(0.8))


def photo_variants(photos: list[Image.Image], count: int, side: int = 160) -> list[Image.Image]:
    """``count`` distinct images made from real photos: each photo as it is, then crops, flips, turns and
    colour shifts of them (deterministic), at most ``side`` pixels on a side to keep decoding cheap."""
    from PIL import ImageEnhance, ImageOps

    out: list[Image.Image] = []
    for n in range(count):
        photo = photos[n % len(photos)].convert("RGB")
        k = n // len(photos)
        rng = random.Random(n)
        img = photo
        if k:
            w, h = img.size
            dx, dy = rng.randint(0, w // 4), rng.randint(0, h // 4)
            img = img.crop((dx, dy, w - rng.randint(0, w // 4), h - rng.randint(0, h // 4)))
            if k % 2:
                img = ImageOps.mirror(img)
            img = img.rotate(rng.choice((0, 90, 180, 270)), expand=True)
            img = ImageEnhance.Color(img).enhance(rng.uniform(0.4, 1.6))
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
        img = img.copy()
        img.thumbnail((side, side))
        out.append(img)
    return out
