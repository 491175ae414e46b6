"""Scenes: one to five coloured shapes on a plain background.

The image is split into a 3x3 grid and every shape sits (with a little jitter) in its own cell, so positions are
unambiguous: a region is the cell's name ("top left", "top middle", ... "bottom right"), "left of" compares the
columns of two shapes in the same row, "above" the rows of two shapes in the same column.  Shapes are drawn without anti-aliasing, so the
pixel at a shape's centre has exactly the colour of :data:`COLORS`.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from vlweave.data.synthetic.common import RGB, Fact, pick_distractors

DOMAIN = "scenes"

COLORS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, RGB] = {"white": (255, 255, 255), "light gray": (225, 225, 225), "cream": (250, 243, 224)}
SHAPES = ("circle", "square", "triangle", "diamond")
REGIONS = (("top left", "top middle", "top right"), ("middle left", "center", "middle right"),
           ("bottom left", "bottom middle", "bottom right"))
RELATIONS = ("left", "right", "above", "below")
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_EXTREMES = {"leftmost": ("col", min), "rightmost": ("col", max), "topmost": ("row", min), "bottommost": ("row", max)}

CATEGORIES: dict[str, tuple[str, ...]] = {
    "yesno": ("existence", "color", "count", "position"),
    "mc": ("existence", "color", "count", "position"),
    "short": ("color", "shape", "count", "position"),
}

MAX_OBJECTS = 5


def make_spec(rng: random.Random, size: int) -> dict:
    """A random scene: background name and objects (shape, colour, grid cell, centre and radius in pixels)."""
    cell = size / 3
    n = rng.randint(1, MAX_OBJECTS)
    objects = []
    for index in sorted(rng.sample(range(9), n)):
        row, col = divmod(index, 3)
        r = rng.randint(max(3, round(size * 0.09)), max(4, round(size * 0.13)))
        jitter = max(0.0, cell / 2 - r - 1)
        cx = round((col + 0.5) * cell + rng.uniform(-jitter, jitter))
        cy = round((row + 0.5) * cell + rng.uniform(-jitter, jitter))
        objects.append({"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "row": row, "col": col,
                        "cx": cx, "cy": cy, "r": r})
    return {"size": size, "background": rng.choice(list(BACKGROUNDS)), "objects": objects}


def render(spec: dict) -> Image.Image:
    size = spec["size"]
    img = Image.new("RGB", (size, size), BACKGROUNDS[spec["background"]])
    draw = ImageDraw.Draw(img)
    for o in spec["objects"]:
        cx, cy, r, fill = o["cx"], o["cy"], o["r"], COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o["shape"] == "square":
            s = round(r * 0.85)
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        elif o["shape"] == "triangle":
            low = cy + round(r * 0.8)
            draw.polygon([(cx, cy - r), (cx + r, low), (cx - r, low)], fill=fill)
        elif o["shape"] == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o['shape']!r}")
    return img


# ------------------------------------------------------------------------------------------------------- facts


def _name(o: dict) -> str:
    return f"{o['color']} {o['shape']}"


def _unique_objects(objects: list[dict]) -> list[dict]:
    """Objects whose colour+shape occurs once, so that "the red circle" names exactly one shape."""
    names = [_name(o) for o in objects]
    return [o for o in objects if names.count(_name(o)) == 1]


def _existence(spec: dict, rng: random.Random) -> Fact:
    objects = spec["objects"]
    present = {_name(o) for o in objects}
    answer = _name(rng.choice(objects))
    absent = [f"{c} {s}" for c in COLORS for s in SHAPES if f"{c} {s}" not in present]
    # POPE's "adversarial" negatives: absent objects sharing the colour or the shape of a present one.
    hard = [a for a in absent if any(a.split()[0] == o["color"] or a.split()[1] == o["shape"] for o in objects)]
    return Fact("existence", "Which of these objects is in the image?", answer,
                pick_distractors(rng, answer, hard, absent, 6),
                claim=lambda v: f"Is there a {v} in the image?")


def _color(spec: dict, rng: random.Random) -> Fact | None:
    objects = spec["objects"]
    shapes = [o["shape"] for o in objects]
    candidates = [o for o in objects if shapes.count(o["shape"]) == 1]
    if not candidates:
        return None
    o = rng.choice(candidates)
    others = [p["color"] for p in objects]
    shape = o["shape"]
    return Fact("color", rng.choice((f"What color is the {shape}?", f"What is the color of the {shape}?")),
                o["color"], pick_distractors(rng, o["color"], others, list(COLORS), 6),
                claim=lambda v: f"Is the {shape} {v}?")


def _shape(spec: dict, rng: random.Random) -> Fact | None:
    objects = spec["objects"]
    colors = [o["color"] for o in objects]
    candidates = [o for o in objects if colors.count(o["color"]) == 1]
    if not candidates:
        return None
    o = rng.choice(candidates)
    color = o["color"]
    return Fact("shape", f"What shape is the {color} object?", o["shape"],
                pick_distractors(rng, o["shape"], [p["shape"] for p in objects], SHAPES, 3),
                claim=lambda v: f"Is the {color} object a {v}?")


def _count(spec: dict, rng: random.Random) -> Fact:
    objects = spec["objects"]
    variant = rng.choice(("all", "color", "shape"))
    if variant == "all":
        n, noun, nouns = len(objects), "shape", "shapes"
    elif variant == "color":
        present = sorted({o["color"] for o in objects}, key=list(COLORS).index)
        color = rng.choice(present) if rng.random() < 0.85 else rng.choice(list(COLORS))
        n, noun, nouns = sum(o["color"] == color for o in objects), f"{color} shape", f"{color} shapes"
    else:
        present = sorted({o["shape"] for o in objects}, key=SHAPES.index)
        shape = rng.choice(present) if rng.random() < 0.85 else rng.choice(SHAPES)
        n, noun, nouns = sum(o["shape"] == shape for o in objects), shape, shape + "s"
    answer = str(n)
    near = [str(n + d) for d in (-1, 1, 2, -2) if 0 <= n + d <= MAX_OBJECTS]

    def claim(v: str) -> str:
        k = int(v)
        if k == 1:
            return f"Is there exactly {k} {noun} in the image?"
        return f"Are there exactly {k} {nouns} in the image?"

    return Fact("count", f"How many {nouns} are there in the image?", answer,
                pick_distractors(rng, answer, near, [str(k) for k in range(MAX_OBJECTS + 1)], 5), claim=claim)


def _region(spec: dict, rng: random.Random) -> Fact | None:
    candidates = _unique_objects(spec["objects"])
    if not candidates:
        return None
    o = rng.choice(candidates)
    answer = REGIONS[o["row"]][o["col"]]
    near = [REGIONS[r][c] for r in range(3) for c in range(3)
            if abs(r - o["row"]) + abs(c - o["col"]) == 1]
    everywhere = [name for row in REGIONS for name in row]
    name = _name(o)
    return Fact("position", f"Where in the image is the {name}?", answer,
                pick_distractors(rng, answer, near, everywhere, 8),
                claim=lambda v: f"Is the {name} in the {v} of the image?")


def _extreme(spec: dict, rng: random.Random) -> Fact | None:
    objects = spec["objects"]
    if len(objects) < 2:
        return None
    options = []
    for word, (axis, pick) in _EXTREMES.items():
        best = pick(o[axis] for o in objects)
        winners = [o for o in objects if o[axis] == best]
        if len(winners) == 1:
            options.append((word, winners[0]))
    if not options:
        return None
    word, o = rng.choice(options)
    others = [p["color"] for p in objects if p is not o]
    return Fact("position", f"What color is the {word} shape?", o["color"],
                pick_distractors(rng, o["color"], others, list(COLORS), 6),
                claim=lambda v: f"Is the {word} shape {v}?")


def _relation(spec: dict, rng: random.Random) -> Fact | None:
    unique = _unique_objects(spec["objects"])
    pairs = [(a, b) for a in unique for b in unique
             if a is not b and (a["row"] == b["row"] or a["col"] == b["col"])]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    if a["row"] == b["row"]:
        answer = "left" if a["col"] < b["col"] else "right"
    else:
        answer = "above" if a["row"] < b["row"] else "below"
    na, nb = _name(a), _name(b)
    claims = {"left": f"Is the {na} to the left of the {nb}?", "right": f"Is the {na} to the right of the {nb}?",
              "above": f"Is the {na} above the {nb}?", "below": f"Is the {na} below the {nb}?"}
    distractors = [_OPPOSITE[answer]] + [r for r in RELATIONS if r not in (answer, _OPPOSITE[answer])]
    return Fact("position", f"Is the {na} left of, right of, above or below the {nb}?", answer, distractors,
                claim=claims.__getitem__, no_values=[_OPPOSITE[answer]])


_POSITION_VARIANTS = {"yesno": (_region, _extreme, _relation), "mc": (_region, _relation),
                      "short": (_extreme, _relation)}


def fact(spec: dict, category: str, fmt: str, rng: random.Random) -> Fact | None:
    """A fact of ``category`` about the scene usable in format ``fmt``, or None when the scene has none."""
    if category == "existence":
        return _existence(spec, rng)
    if category == "color":
        return _color(spec, rng)
    if category == "shape":
        return _shape(spec, rng)
    if category == "count":
        return _count(spec, rng)
    if category == "position":
        variants = list(_POSITION_VARIANTS[fmt])
        rng.shuffle(variants)
        for variant in variants:
            found = variant(spec, rng)
            if found is not None and found.supports(fmt):
                return found
        return None
    raise ValueError(f"unknown scenes category {category!r}")
