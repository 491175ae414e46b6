"""Documents: a small receipt, form or product label, rendered with PIL's built-in font.

Every document is a list of lines; the first is a title (one word), the others are ``key`` + ``value`` pairs
("Bread ... 5" on a receipt, "Age: 42" on a form or label).  The questions need the text to be read: the word in
a given line, the number after a key (e.g. "What is the number after 'Total'?"), which item has a given number,
and whether a word is written at all.  Words are drawn capitalised and answered in lower case.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from vlweave.data.synthetic.common import ORDINALS, RGB, Fact, fit_font_size, font, pick_distractors, text_width

DOMAIN = "documents"

STORES = ("Market", "Bakery", "Cafe", "Diner", "Shop", "Store", "Deli", "Kiosk")
ITEMS = ("Apple", "Bread", "Milk", "Eggs", "Rice", "Tea", "Jam", "Fish", "Cake", "Soup", "Corn", "Salt",
         "Lime", "Plum", "Beans", "Honey")
FORM_TITLES = ("Form", "Order", "Ticket", "Pass", "Permit")
PRODUCTS = ("Olive", "Coffee", "Flour", "Sugar", "Cocoa", "Pasta", "Juice", "Butter")
NAMES = ("Anna", "Ben", "Carl", "Dora", "Emma", "Finn", "Gina", "Hugo", "Ivy", "Jack", "Kate", "Leo", "Mia",
         "Noah", "Omar", "Paul")
CITIES = ("Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Delhi", "Quito", "Riga", "Bern", "Doha", "Lyon")
# key -> (word pool) or (low, high) for numbers
FORM_FIELDS: dict[str, tuple] = {"Name": NAMES, "City": CITIES, "Age": (18, 89), "Room": (1, 99),
                                 "Code": (100, 999), "Seat": (1, 60)}
LABEL_FIELDS: dict[str, tuple] = {"Size": (100, 900), "Qty": (2, 24), "Lot": (10, 99), "Batch": (1, 9),
                                  "Grade": ("Gold", "Silver", "Green", "Red")}

PAPERS: dict[str, RGB] = {"white": (255, 255, 255), "cream": (250, 244, 226), "light blue": (228, 238, 250)}
INKS: dict[str, RGB] = {"black": (15, 15, 15), "navy": (20, 30, 110), "brown": (80, 40, 20)}

KINDS = ("receipt", "form", "label")

#: every word that can appear in a document (the pool that "absent word" distractors come from)
ALL_WORDS = tuple(dict.fromkeys(STORES + ITEMS + FORM_TITLES + PRODUCTS + NAMES + CITIES + ("Total",)
                                + tuple(FORM_FIELDS) + tuple(LABEL_FIELDS) + LABEL_FIELDS["Grade"]))

CATEGORIES: dict[str, tuple[str, ...]] = {
    "yesno": ("presence", "line_word", "key_value"),
    "mc": ("presence", "line_word", "key_value"),
    "short": ("line_word", "key_value", "lookup"),
}


def _field_value(rng: random.Random, spec: tuple) -> str:
    if isinstance(spec[0], str):
        return rng.choice(spec)
    return str(rng.randint(spec[0], spec[1]))


def make_spec(rng: random.Random, size: int) -> dict:
    kind = rng.choice(KINDS)
    if kind == "receipt":
        items = rng.sample(ITEMS, rng.randint(2, 4))
        prices = rng.sample(range(1, 10), len(items))  # distinct, so "which item costs 7?" has one answer
        lines = [{"key": rng.choice(STORES), "value": None}]
        lines += [{"key": item, "value": str(p)} for item, p in zip(items, prices)]
        lines.append({"key": "Total", "value": str(sum(prices))})
    elif kind == "form":
        keys = rng.sample(list(FORM_FIELDS), rng.randint(3, 4))
        lines = [{"key": rng.choice(FORM_TITLES), "value": None}]
        lines += [{"key": k, "value": _field_value(rng, FORM_FIELDS[k])} for k in keys]
    else:
        keys = rng.sample(list(LABEL_FIELDS), rng.randint(2, 3))
        lines = [{"key": rng.choice(PRODUCTS), "value": None}]
        lines += [{"key": k, "value": _field_value(rng, LABEL_FIELDS[k])} for k in keys]
    texts = [_line_text(kind, line) for line in lines]
    margin = max(3, round(size * 0.06))
    font_size = fit_font_size(texts, size - 2 * margin - 8, start=max(7, round(size * 0.095)))
    line_height = font_size + max(2, round(font_size * 0.35))
    free_y = max(0, size - 2 * margin - line_height * len(lines))
    return {
        "size": size, "kind": kind, "paper": rng.choice(list(PAPERS)), "ink": rng.choice(list(INKS)),
        "font_size": font_size, "line_height": line_height,
        "x0": margin + rng.randint(0, 3), "y0": margin + rng.randint(0, free_y), "lines": lines,
    }


def _line_text(kind: str, line: dict) -> str:
    if line["value"] is None:
        return line["key"]
    if kind == "receipt":
        return f"{line['key']}    {line['value']}"
    return f"{line['key']}: {line['value']}"


def render(spec: dict) -> Image.Image:
    size, kind = spec["size"], spec["kind"]
    img = Image.new("RGB", (size, size), PAPERS[spec["paper"]])
    draw = ImageDraw.Draw(img)
    ink = INKS[spec["ink"]]
    f = font(spec["font_size"])
    x0, y, lh = spec["x0"], spec["y0"], spec["line_height"]
    x1 = size - x0
    if kind == "label":
        draw.rectangle((x0 - 3, y - 2, x1 + 2, y + lh * len(spec["lines"]) + 1), outline=ink)
    for i, line in enumerate(spec["lines"]):
        if line["value"] is None:  # title: centred on receipts and labels, bold-ish (drawn twice)
            w = text_width(line["key"], spec["font_size"])
            x = round((size - w) / 2) if kind in ("receipt", "label") else x0
            draw.text((x, y), line["key"], fill=ink, font=f)
            draw.text((x + 1, y), line["key"], fill=ink, font=f)
        elif kind == "receipt":
            if line["key"] == "Total":
                draw.line((x0, y, x1, y), fill=ink)
            draw.text((x0, y + 1), line["key"], fill=ink, font=f)
            draw.text((x1 - text_width(line["value"], spec["font_size"]), y + 1), line["value"], fill=ink, font=f)
        else:
            draw.text((x0, y), _line_text(kind, line), fill=ink, font=f)
        y += lh
    return img


# ------------------------------------------------------------------------------------------------------- facts


def words_in(spec: dict) -> list[str]:
    """Every word written on the document (capitalised, as drawn), in reading order."""
    out = []
    for line in spec["lines"]:
        out.append(line["key"])
        if line["value"] is not None and not line["value"].isdigit():
            out.append(line["value"])
    return out


def _is_number(value: str | None) -> bool:
    return value is not None and value.isdigit()


def _near_numbers(value: int, rng: random.Random) -> list[str]:
    step = 1 if value < 30 else rng.choice((1, 10))
    cands = [value + d * step for d in (1, -1, 2, -2, 3)] + [value + 10, value - 10]
    return [str(c) for c in cands if c > 0]


def _key_value(spec: dict, rng: random.Random) -> Fact:
    lines = [ln for ln in spec["lines"] if ln["value"] is not None]
    if spec["kind"] == "receipt" and rng.random() < 0.35:
        line = lines[-1]  # the Total
    else:
        line = rng.choice(lines)
    key, value = line["key"], line["value"]
    if _is_number(value):
        others = [ln["value"] for ln in lines if _is_number(ln["value"])]
        v = int(value)
        pool = [str(v + d) for d in range(-12, 13) if v + d > 0]
        if spec["kind"] == "receipt" and key != "Total" and rng.random() < 0.5:
            question = f"What is the price of {key.lower()}?"
        else:
            question = rng.choice((f"What is the number after '{key}'?", f"What number is written next to '{key}'?"))
        return Fact("key_value", question, value,
                    pick_distractors(rng, value, others + _near_numbers(v, rng), pool, 6),
                    claim=lambda c: f"Is the number after '{key}' {c}?")
    answer = value.lower()
    field_pool = {**FORM_FIELDS, **LABEL_FIELDS}[key]
    others = [ln["value"].lower() for ln in lines if not _is_number(ln["value"])]
    return Fact("key_value", f"What is written after '{key}'?", answer,
                pick_distractors(rng, answer, others, [w.lower() for w in field_pool], 6),
                claim=lambda c: f"Is the word after '{key}' '{c.capitalize()}'?")


def _line_word(spec: dict, rng: random.Random) -> Fact:
    lines = spec["lines"]
    i = rng.randrange(len(lines))
    line = lines[i]
    ordinal = ORDINALS[i]
    answer = line["key"].lower()
    in_line = {answer} | ({line["value"].lower()} if line["value"] else set())
    on_page = [w.lower() for w in words_in(spec) if w.lower() not in in_line]
    pool = [w.lower() for w in ALL_WORDS if w.lower() not in in_line]
    if spec["kind"] == "receipt":  # one word per line: the number is not a word
        question = f"What word is written in the {ordinal} line?"
        claim = lambda c: f"Is the word in the {ordinal} line '{c.capitalize()}'?"  # noqa: E731
    else:
        question = f"What is the first word in the {ordinal} line?"
        claim = lambda c: f"Is the first word in the {ordinal} line '{c.capitalize()}'?"  # noqa: E731
    return Fact("line_word", question, answer, pick_distractors(rng, answer, on_page, pool, 6), claim=claim)


def _presence(spec: dict, rng: random.Random) -> Fact:
    present = {w.lower() for w in words_in(spec)}
    answer = rng.choice(words_in(spec)).lower()
    absent = [w.lower() for w in ALL_WORDS if w.lower() not in present]
    # hard negatives: words of the same vocabulary as the document's (another item on a receipt, ...)
    kind_pool = {"receipt": STORES + ITEMS, "form": FORM_TITLES + NAMES + CITIES,
                 "label": PRODUCTS + LABEL_FIELDS["Grade"]}[spec["kind"]]
    hard = [w.lower() for w in kind_pool if w.lower() not in present]
    return Fact("presence", "Which of these words is written in the image?", answer,
                pick_distractors(rng, answer, hard, absent, 6),
                claim=lambda c: f"Is the word '{c.capitalize()}' written in the image?")


def _lookup(spec: dict, rng: random.Random) -> Fact | None:
    lines = [ln for ln in spec["lines"] if _is_number(ln["value"])]
    values = [ln["value"] for ln in lines]
    candidates = [ln for ln in lines if values.count(ln["value"]) == 1]
    if not candidates:
        return None
    line = rng.choice(candidates)
    answer, value = line["key"].lower(), line["value"]
    others = [ln["key"].lower() for ln in spec["lines"] if ln is not line]
    if spec["kind"] == "receipt" and line["key"] != "Total":
        question = f"Which item costs {value}?"
        pool = [w.lower() for w in ITEMS]
    else:
        question = f"Which word is followed by the number {value}?"
        pool = [w.lower() for w in ("Total",) + tuple(FORM_FIELDS) + tuple(LABEL_FIELDS)]
    return Fact("lookup", question, answer, pick_distractors(rng, answer, others, pool, 6),
                claim=lambda c: f"Is '{c.capitalize()}' followed by the number {value}?")


def fact(spec: dict, category: str, fmt: str, rng: random.Random) -> Fact | None:
    if category == "key_value":
        return _key_value(spec, rng)
    if category == "line_word":
        return _line_word(spec, rng)
    if category == "presence":
        return _presence(spec, rng)
    if category == "lookup":
        return _lookup(spec, rng)
    raise ValueError(f"unknown documents category {category!r}")
