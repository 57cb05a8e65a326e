"""Scatter plots of per-generation scores drawn with PIL (the paper's Fig. 9 / Tab. 3 plots).

One point per generation, one colour per model, each model's mean as a larger outlined marker, a
legend, ticked axes, and the diagonal y = x: both axes share one range, so the diagonal runs corner
to corner and a model whose generations balance the two scores sits on it (Supp. A.3).
"""
from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

# matplotlib's tab10, so the colours read as usual
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)   # Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def _text_size(draw, text, font):
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """About `target` round tick values (steps of 1, 2 or 5 x 10^k) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1e-3
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def axis_range(values: list[float]) -> tuple[float, float]:
    """A range holding all values with a margin, snapped outwards to a round step."""
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = max((hi - lo) * 0.05, 0.01)
    lo, hi = lo - pad, hi + pad
    ticks = nice_ticks(lo, hi, target=12)
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 0.1
    return math.floor(lo / step) * step, math.ceil(hi / step) * step


def scatter(path, series: list[tuple], *, xlabel: str, ylabel: str, title: str, size: int = 640) -> None:
    """Write a PNG scatter plot: `series` is [(model name, xs, ys)] or [(name, xs, ys, point labels)],
    one colour each; labelled points are drawn larger, with their label beside them."""
    font, small, big = _font(14), _font(12), _font(16)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    series = [(s[0], list(s[1]), list(s[2]), list(s[3]) if len(s) > 3 else None) for s in series]
    everything = [v for _, xs, ys, _ in series for v in (*xs, *ys)]
    lo, hi = axis_range(everything)
    ticks = [t for t in nice_ticks(lo, hi, target=8) if lo - 1e-9 <= t <= hi + 1e-9]
    decimals = max(0, -math.floor(math.log10(ticks[1] - ticks[0]))) if len(ticks) > 1 else 2
    labels = [f"{t:.{decimals}f}" for t in ticks]

    legend = [(name, PALETTE[i % len(PALETTE)]) for i, (name, _, _, _) in enumerate(series)]
    legend_w = max([_text_size(probe, f"{n} (n={len(xs)})", font)[0] for (n, xs, _, _) in series] + [0]) + 40
    tick_w = max(_text_size(probe, s, small)[0] for s in labels)
    left, top = 30 + tick_w + 16, 50
    plot = size
    width, height = left + plot + 30 + legend_w + 20, top + plot + 70

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    tw, _ = _text_size(d, title, big)
    d.text((left + (plot - tw) // 2, 15), title, fill="black", font=big)

    def px(x, y):
        return left + (x - lo) / (hi - lo) * plot, top + plot - (y - lo) / (hi - lo) * plot

    # grid, ticks and their labels
    for t, s in zip(ticks, labels):
        x, _ = px(t, lo)
        _, y = px(lo, t)
        d.line([x, top, x, top + plot], fill=(235, 235, 235))
        d.line([left, y, left + plot, y], fill=(235, 235, 235))
        d.line([x, top + plot, x, top + plot + 5], fill="black")
        d.line([left - 5, y, left, y], fill="black")
        w, h = _text_size(d, s, small)
        d.text((x - w / 2, top + plot + 8), s, fill="black", font=small)
        d.text((left - 8 - w, y - h / 2 - 2), s, fill="black", font=small)
    d.rectangle([left, top, left + plot, top + plot], outline="black")
    d.line([*px(lo, lo), *px(hi, hi)], fill=(120, 120, 120), width=1)   # the diagonal y = x
    w, _ = _text_size(d, xlabel, font)
    d.text((left + (plot - w) / 2, top + plot + 32), xlabel, fill="black", font=font)
    x0, y0, x1, y1 = d.textbbox((0, 0), ylabel, font=font)
    label = Image.new("RGB", (x1 - x0 + 4, y1 - y0 + 4), "white")
    ImageDraw.Draw(label).text((2 - x0, 2 - y0), ylabel, fill="black", font=font)
    label = label.rotate(90, expand=True)
    img.paste(label, (6, int(top + (plot - label.height) / 2)))

    # points (translucent, so dense clusters show), then each model's mean on top
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    dl = ImageDraw.Draw(layer)
    for (name, xs, ys, labels), (_, colour) in zip(series, legend):
        r = 3 if labels is None else 5
        for x, y in zip(xs, ys):
            cx, cy = px(x, y)
            dl.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(*colour, 110 if labels is None else 200))
    img.paste(layer, (0, 0), layer)
    placed = []   # label boxes so far: a label that would overlap one moves down a line until it does not
    for (name, xs, ys, labels), (_, colour) in zip(series, legend):
        for x, y, text in zip(xs, ys, labels or []):
            cx, cy = px(x, y)
            w, h = _text_size(d, text, small)
            ty = cy - 7
            while any(cx + 8 < bx1 and bx0 < cx + 8 + w and ty < by1 and by0 < ty + h + 2 for bx0, by0, bx1, by1 in placed):
                ty += h + 3
            placed.append((cx + 8, ty, cx + 8 + w, ty + h + 2))
            d.text((cx + 8, ty), text, fill=colour, font=small)
    for (name, xs, ys, labels), (_, colour) in zip(series, legend):
        if xs:
            cx, cy = px(sum(xs) / len(xs), sum(ys) / len(ys))
            d.ellipse([cx - 7, cy - 7, cx + 7, cy + 7], fill=colour, outline="black", width=2)

    # legend
    lx, ly = left + plot + 30, top
    for (name, xs, _, _), (_, colour) in zip(series, legend):
        d.ellipse([lx, ly + 3, lx + 12, ly + 15], fill=colour, outline="black")
        d.text((lx + 20, ly), f"{name} (n={len(xs)})", fill="black", font=font)
        ly += 24
    d.text((lx, ly + 8), "large marker: mean", fill=(90, 90, 90), font=small)
    d.text((lx, ly + 26), "line: y = x", fill=(90, 90, 90), font=small)
    img.save(path)
