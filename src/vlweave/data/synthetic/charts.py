"""Charts: bar charts drawn with PIL, 3-6 labelled bars with small integer values.

Values are distinct integers 1..9 (so the highest and the lowest bar are unique), drawn on a 0..10 scale with a
light gridline every 2 units and the value printed above each bar.  Labels are short animal names under the bars.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from vlweave.data.synthetic.common import RGB, Fact, fit_font_size, font, pick_distractors, text_width

DOMAIN = "charts"

LABELS = ("cat", "dog", "owl", "fox", "bee", "cow", "pig", "hen", "ant", "elk", "yak", "emu", "bat", "rat",
          "eel", "ram")
BAR_COLORS: dict[str, RGB] = {"blue": (50, 100, 200), "green": (40, 150, 70), "orange": (235, 130, 30),
                              "purple": (130, 70, 170), "red": (200, 50, 50), "teal": (20, 140, 140),
                              "gray": (110, 110, 110)}
MAX_VALUE = 10
MIN_BARS, MAX_BARS = 3, 6
GRID_STEP = 2

CATEGORIES: dict[str, tuple[str, ...]] = {
    "yesno": ("extreme", "value", "compare"),
    "mc": ("extreme", "value", "count"),
    "short": ("extreme", "value", "compare"),
}


def make_spec(rng: random.Random, size: int) -> dict:
    n = rng.randint(MIN_BARS, MAX_BARS)
    labels = rng.sample(LABELS, n)
    values = rng.sample(range(1, MAX_VALUE), n)
    margin = max(2, round(size * 0.03))
    slot = (size - 2 * margin) / n
    start = max(6, round(size * 0.085))
    return {"size": size, "bars": [{"label": lab, "value": v} for lab, v in zip(labels, values)],
            "color": rng.choice(list(BAR_COLORS)), "margin": margin,
            "font_size": fit_font_size(labels, slot - 2, start=start),  # labels
            "value_font_size": fit_font_size([str(v) for v in values], slot * 0.62, start=start)}


def layout(spec: dict) -> dict:
    """Pixel geometry of the chart: plot box and each bar's box (x0, y0, x1, y1)."""
    size, fs, margin, n = spec["size"], spec["font_size"], spec["margin"], len(spec["bars"])
    top = margin + spec["value_font_size"] + 3
    baseline = size - margin - fs - 4
    plot_h = baseline - top
    slot = (size - 2 * margin) / n
    boxes = []
    for i, bar in enumerate(spec["bars"]):
        cx = margin + slot * (i + 0.5)
        half = slot * 0.31
        height = round(bar["value"] / MAX_VALUE * plot_h)
        boxes.append((round(cx - half), baseline - height, round(cx + half), baseline))
    return {"top": top, "baseline": baseline, "plot_h": plot_h, "slot": slot, "boxes": boxes}


def render(spec: dict) -> Image.Image:
    size, fs, margin = spec["size"], spec["font_size"], spec["margin"]
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    geo = layout(spec)
    f = font(fs)
    for v in range(GRID_STEP, MAX_VALUE + 1, GRID_STEP):
        y = geo["baseline"] - round(v / MAX_VALUE * geo["plot_h"])
        draw.line((margin, y, size - margin, y), fill=(215, 215, 215))
    fill = BAR_COLORS[spec["color"]]
    for bar, (x0, y0, x1, y1) in zip(spec["bars"], geo["boxes"]):
        draw.rectangle((x0, y0, x1, y1 - 1), fill=fill)
        cx = (x0 + x1) / 2
        value, vfs = str(bar["value"]), spec["value_font_size"]
        draw.text((round(cx - text_width(value, vfs) / 2), y0 - vfs - 2), value, fill=(20, 20, 20), font=font(vfs))
        draw.text((round(cx - text_width(bar["label"], fs) / 2), geo["baseline"] + 2), bar["label"],
                  fill=(20, 20, 20), font=f)
    draw.line((margin, geo["baseline"], size - margin, geo["baseline"]), fill=(40, 40, 40))
    return img


# ------------------------------------------------------------------------------------------------------- facts


def highest(spec: dict) -> str:
    return max(spec["bars"], key=lambda b: b["value"])["label"]


def lowest(spec: dict) -> str:
    return min(spec["bars"], key=lambda b: b["value"])["label"]


def _extreme(spec: dict, rng: random.Random) -> Fact:
    bars = spec["bars"]
    labels = [b["label"] for b in bars]
    if rng.random() < 0.5:
        answer, word, adjective = highest(spec), "highest", "largest"
        ranked = sorted(bars, key=lambda b: -b["value"])
    else:
        answer, word, adjective = lowest(spec), "lowest", "smallest"
        ranked = sorted(bars, key=lambda b: b["value"])
    in_chart = [b["label"] for b in ranked[1:]]  # runner-up first: the hardest distractor
    distractors = in_chart[:1] + pick_distractors(rng, answer, in_chart[1:], [x for x in LABELS if x not in labels], 5)
    question = rng.choice((f"Which bar is the {word}?", f"Which label has the {adjective} value?"))
    return Fact("extreme", question, answer, distractors,
                claim=lambda c: f"Is the {c} bar the {word}?", no_values=in_chart)


def _value(spec: dict, rng: random.Random) -> Fact:
    bar = rng.choice(spec["bars"])
    v, label = bar["value"], bar["label"]
    answer = str(v)
    near = [str(v + d) for d in (1, -1, 2, -2) if 0 < v + d <= MAX_VALUE]
    others = [str(b["value"]) for b in spec["bars"] if b is not bar]
    return Fact("value", f"What is the value of the {label} bar?", answer,
                pick_distractors(rng, answer, near + others[:2], [str(k) for k in range(1, MAX_VALUE + 1)], 6),
                claim=lambda c: f"Is the value of the {label} bar {c}?")


def _compare(spec: dict, rng: random.Random) -> Fact:
    a, b = rng.sample(spec["bars"], 2)
    answer = a["label"] if a["value"] > b["value"] else b["label"]
    other = {a["label"]: b["label"], b["label"]: a["label"]}
    return Fact("compare", f"Which is higher, the {a['label']} bar or the {b['label']} bar?", answer,
                [other[answer]], claim=lambda c: f"Is the {c} bar higher than the {other[c]} bar?")


def _count(spec: dict, rng: random.Random) -> Fact:
    n = len(spec["bars"])
    answer = str(n)
    near = [str(n + d) for d in (1, -1, 2, -2) if n + d >= 1]
    return Fact("count", "How many bars are in the chart?", answer,
                pick_distractors(rng, answer, near, [str(k) for k in range(1, MAX_BARS + 3)], 5),
                claim=lambda c: f"Are there {c} bars in the chart?")


def fact(spec: dict, category: str, fmt: str, rng: random.Random) -> Fact | None:
    if category == "extreme":
        return _extreme(spec, rng)
    if category == "value":
        return _value(spec, rng)
    if category == "compare":
        return _compare(spec, rng)
    if category == "count":
        return _count(spec, rng)
    raise ValueError(f"unknown charts category {category!r}")
