"""The synthetic multi-domain benchmark (vlweave.data.synthetic): determinism, formats, and answers that agree with
the images.

Answers are re-derived here independently of the generator's question code: an oracle parses every question text
and answers it from the stored spec (specs.json) or from the pixels, and each spec is re-rendered and compared to
its PNG, so a spec describes exactly what was drawn.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from vlweave.data.synthetic import (
    CIRCULAR_OFFSET,
    DEFAULTS,
    DOMAINS,
    MC_SUFFIX,
    SHORT_SUFFIX,
    build_benchmark,
    content_hash,
    is_prepared,
    params_hash,
    prepare_benchmark,
    prepare_from_name,
    rotate_mc,
)
from vlweave.data.synthetic import charts, documents, scenes

LETTERS = "ABCD"
SMALL = {"train_per_domain": 30, "test_per_domain": 12}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


class Bench:
    """A built benchmark folder, loaded."""

    def __init__(self, folder: Path, meta_returned: dict) -> None:
        self.folder = folder
        self.returned = meta_returned
        self.meta = json.loads((folder / "meta.json").read_text())
        self.train = json.loads((folder / "train.json").read_text())
        self.yesno = read_jsonl(folder / "test_yesno.jsonl")
        self.mc = read_jsonl(folder / "test_mc.jsonl")
        self.short = read_jsonl(folder / "test_short.jsonl")
        self.specs = json.loads((folder / "specs.json").read_text())

    def image(self, rel: str) -> Image.Image:
        return Image.open(self.folder / rel)

    def spec(self, rel: str) -> dict:
        return self.specs[rel]["spec"]


@pytest.fixture(scope="module")
def default_pair(tmp_path_factory) -> tuple[Bench, Bench]:
    """The default benchmark, built twice into different folders."""
    out = []
    for name in ("default-a", "default-b"):
        folder = tmp_path_factory.mktemp(name)
        out.append(Bench(folder, build_benchmark(folder)))
    return out[0], out[1]


@pytest.fixture(scope="module")
def bench(default_pair) -> Bench:
    return default_pair[0]


@pytest.fixture(scope="module")
def small_128(tmp_path_factory) -> Bench:
    folder = tmp_path_factory.mktemp("small128")
    return Bench(folder, build_benchmark(folder, image_size=128, **SMALL))


# ------------------------------------------------------------------------------------------------- the oracle
# Answers every question template from the spec (or pixels), independently of the generator's question code.

def _scene_objects(spec: dict) -> list[dict]:
    return spec["objects"]


def _scene_named(spec: dict, name: str) -> dict:
    color, shape = name.split()
    found = [o for o in spec["objects"] if o["color"] == color and o["shape"] == shape]
    assert len(found) == 1, f"{name!r} does not name exactly one object"
    return found[0]


def _scene_region(o: dict, size: int) -> str:
    col, row = o["cx"] * 3 // size, o["cy"] * 3 // size
    vert = ("top", "middle", "bottom")[row]
    horiz = ("left", "middle", "right")[col]
    return "center" if (vert, horiz) == ("middle", "middle") else f"{vert} {horiz}"


def _scene_count(spec: dict, noun: str) -> int:
    objs = spec["objects"]
    words = noun.split()
    if words == ["shapes"] or words == ["shape"]:
        return len(objs)
    if words[-1] in ("shape", "shapes"):
        return sum(o["color"] == words[0] for o in objs)
    return sum(o["shape"] == words[0].rstrip("s") for o in objs)


def _scene_extreme(spec: dict, word: str) -> dict:
    key = {"leftmost": lambda o: o["cx"], "rightmost": lambda o: -o["cx"],
           "topmost": lambda o: o["cy"], "bottommost": lambda o: -o["cy"]}[word]
    ranked = sorted(spec["objects"], key=key)
    assert key(ranked[0]) < key(ranked[1]), f"{word} shape is not unique"
    return ranked[0]


def _scene_relation(a: dict, b: dict) -> str:
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    assert abs(dx) > 3 * abs(dy) or abs(dy) > 3 * abs(dx), "relation between diagonal shapes"
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def scene_open(spec: dict, q: str):
    """(kind, truth): kind "one" -> truth is the single right answer; "set" -> any member is right."""
    size = spec["size"]
    if m := re.fullmatch(r"What (?:color is|is the color of) the (\w+)\?", q):
        objs = [o for o in spec["objects"] if o["shape"] == m[1]]
        assert len(objs) == 1
        return "one", objs[0]["color"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        objs = [o for o in spec["objects"] if o["color"] == m[1]]
        assert len(objs) == 1
        return "one", objs[0]["shape"]
    if m := re.fullmatch(r"How many (.+) are there in the image\?", q):
        return "one", str(_scene_count(spec, m[1]))
    if m := re.fullmatch(r"What color is the (\w+) shape\?", q):
        return "one", _scene_extreme(spec, m[1])["color"]
    if m := re.fullmatch(r"Where in the image is the (\w+ \w+)\?", q):
        return "one", _scene_region(_scene_named(spec, m[1]), size)
    if m := re.fullmatch(r"Is the (\w+ \w+) left of, right of, above or below the (\w+ \w+)\?", q):
        return "one", _scene_relation(_scene_named(spec, m[1]), _scene_named(spec, m[2]))
    if q == "Which of these objects is in the image?":
        return "set", {f"{o['color']} {o['shape']}" for o in spec["objects"]}
    raise AssertionError(f"unknown scenes question {q!r}")


def scene_claim(spec: dict, q: str) -> bool:
    size = spec["size"]
    present = {f"{o['color']} {o['shape']}" for o in spec["objects"]}
    if m := re.fullmatch(r"Is there a (\w+ \w+) in the image\?", q):
        return m[1] in present
    if m := re.fullmatch(r"Is the (circle|square|triangle|diamond) (\w+)\?", q):
        return scene_open(spec, f"What color is the {m[1]}?")[1] == m[2]
    if m := re.fullmatch(r"Is the (\w+) object a (\w+)\?", q):
        return scene_open(spec, f"What shape is the {m[1]} object?")[1] == m[2]
    if m := re.fullmatch(r"(?:Is|Are) there exactly (\d+) (.+) in the image\?", q):
        return _scene_count(spec, m[2]) == int(m[1])
    if m := re.fullmatch(r"Is the (\w+ \w+) in the (.+) of the image\?", q):
        return _scene_region(_scene_named(spec, m[1]), size) == m[2]
    if m := re.fullmatch(r"Is the (leftmost|rightmost|topmost|bottommost) shape (\w+)\?", q):
        return _scene_extreme(spec, m[1])["color"] == m[2]
    if m := re.fullmatch(r"Is the (\w+ \w+) to the (left|right) of the (\w+ \w+)\?", q):
        return _scene_relation(_scene_named(spec, m[1]), _scene_named(spec, m[3])) == m[2]
    if m := re.fullmatch(r"Is the (\w+ \w+) (above|below) the (\w+ \w+)\?", q):
        return _scene_relation(_scene_named(spec, m[1]), _scene_named(spec, m[3])) == m[2]
    raise AssertionError(f"unknown scenes claim {q!r}")


_ORD = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")


def _doc_line(spec: dict, ordinal: str) -> dict:
    return spec["lines"][_ORD.index(ordinal)]


def _doc_value(spec: dict, key: str) -> str:
    found = [ln for ln in spec["lines"] if ln["key"] == key and ln["value"] is not None]
    assert len(found) == 1
    return found[0]["value"].lower()


def _doc_key_of(spec: dict, number: str) -> str:
    found = [ln for ln in spec["lines"] if ln["value"] == number]
    assert len(found) == 1, f"number {number} is not unique on the document"
    return found[0]["key"].lower()


def _doc_words(spec: dict) -> set[str]:
    words = set()
    for ln in spec["lines"]:
        words.add(ln["key"].lower())
        if ln["value"] is not None and not ln["value"].isdigit():
            words.add(ln["value"].lower())
    return words


def doc_open(spec: dict, q: str):
    if m := re.fullmatch(r"What (?:word is written in the|is the first word in the) (\w+) line\?", q):
        if q.startswith("What word"):
            assert spec["kind"] == "receipt"  # one word per line
        return "one", _doc_line(spec, m[1])["key"].lower()
    if m := re.fullmatch(r"What (?:is the number after|number is written next to|is written after) '(\w+)'\?", q):
        return "one", _doc_value(spec, m[1])
    if m := re.fullmatch(r"What is the price of (\w+)\?", q):
        return "one", _doc_value(spec, m[1].capitalize())
    if m := re.fullmatch(r"Which (?:item costs|word is followed by the number) (\d+)\?", q):
        return "one", _doc_key_of(spec, m[1])
    if q == "Which of these words is written in the image?":
        return "set", _doc_words(spec)
    raise AssertionError(f"unknown documents question {q!r}")


def doc_claim(spec: dict, q: str) -> bool:
    if m := re.fullmatch(r"Is the (?:first )?word in the (\w+) line '(\w+)'\?", q):
        return _doc_line(spec, m[1])["key"] == m[2]
    if m := re.fullmatch(r"Is the number after '(\w+)' (\d+)\?", q):
        return _doc_value(spec, m[1]) == m[2]
    if m := re.fullmatch(r"Is the word after '(\w+)' '(\w+)'\?", q):
        return _doc_value(spec, m[1]) == m[2].lower()
    if m := re.fullmatch(r"Is the word '(\w+)' written in the image\?", q):
        return m[1].lower() in _doc_words(spec)
    if m := re.fullmatch(r"Is '(\w+)' followed by the number (\d+)\?", q):
        return _doc_key_of(spec, m[2]) == m[1].lower()
    raise AssertionError(f"unknown documents claim {q!r}")


def _bar(spec: dict, label: str) -> int:
    (value,) = [b["value"] for b in spec["bars"] if b["label"] == label]
    return value


def chart_open(spec: dict, q: str):
    values = {b["label"]: b["value"] for b in spec["bars"]}
    if m := re.fullmatch(r"Which (?:bar is the (highest|lowest)|label has the (largest|smallest) value)\?", q):
        high = (m[1] or m[2]) in ("highest", "largest")
        return "one", (max if high else min)(values, key=values.get)
    if m := re.fullmatch(r"What is the value of the (\w+) bar\?", q):
        return "one", str(values[m[1]])
    if m := re.fullmatch(r"Which is higher, the (\w+) bar or the (\w+) bar\?", q):
        return "one", m[1] if values[m[1]] > values[m[2]] else m[2]
    if q == "How many bars are in the chart?":
        return "one", str(len(values))
    raise AssertionError(f"unknown charts question {q!r}")


def chart_claim(spec: dict, q: str) -> bool:
    values = {b["label"]: b["value"] for b in spec["bars"]}
    if m := re.fullmatch(r"Is the (\w+) bar the (highest|lowest)\?", q):
        return chart_open(spec, f"Which bar is the {m[2]}?")[1] == m[1]
    if m := re.fullmatch(r"Is the value of the (\w+) bar (\d+)\?", q):
        return values[m[1]] == int(m[2])
    if m := re.fullmatch(r"Is the (\w+) bar higher than the (\w+) bar\?", q):
        return values[m[1]] > values[m[2]]
    if m := re.fullmatch(r"Are there (\d+) bars in the chart\?", q):
        return len(values) == int(m[1])
    raise AssertionError(f"unknown charts claim {q!r}")


ORACLE = {"scenes": (scene_open, scene_claim), "documents": (doc_open, doc_claim), "charts": (chart_open, chart_claim)}


def is_right(domain: str, spec: dict, question: str, value: str) -> bool:
    kind, truth = ORACLE[domain][0](spec, question)
    return value in truth if kind == "set" else value == truth


def split_prompt(text: str) -> tuple[str, list[str] | None, str]:
    """(question, options or None, suffix) of a prompt text."""
    lines = text.split("\n")
    options = [ln[3:] for ln in lines[1:-1] if re.match(r"[A-D]\. ", ln)]
    return lines[0], (options or None), lines[-1]


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_gives_byte_identical_files(default_pair):
    a, b = default_pair
    ta, tb = tree(a.folder), tree(b.folder)
    assert ta == tb
    assert a.meta["content_hash"] == b.meta["content_hash"] == content_hash(a.folder) == content_hash(b.folder)
    assert a.returned["content_hash"] == a.meta["content_hash"]


def test_different_seeds_differ(tmp_path, small_128):
    one = tmp_path / "seed1"
    meta = build_benchmark(one, seed=1, image_size=128, **SMALL)
    assert meta["content_hash"] != small_128.meta["content_hash"]
    assert meta["params_hash"] != small_128.meta["params_hash"]
    other = Bench(one, meta)
    images0 = {sha(small_128.folder / p) for p in small_128.specs}
    images1 = {sha(one / p) for p in other.specs}
    assert not images0 & images1
    assert [r["text"] for r in other.short] != [r["text"] for r in small_128.short]


def test_build_does_not_depend_on_the_hash_seed(tmp_path, small_128):
    """Fresh interpreters with other PYTHONHASHSEEDs (set/dict-order of strings) build the same files."""
    code = ("import sys; from vlweave.data.synthetic import build_benchmark; "
            f"m = build_benchmark(sys.argv[1], image_size=128, **{SMALL!r}); print(m['content_hash'])")
    for hash_seed in ("1", "987"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / hash_seed)], env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
        assert out == small_128.meta["content_hash"]
        assert tree(tmp_path / hash_seed) == tree(small_128.folder)


def test_test_split_does_not_depend_on_train_size(tmp_path, small_128):
    out = tmp_path / "fewer-train"
    build_benchmark(out, image_size=128, train_per_domain=7, test_per_domain=SMALL["test_per_domain"])
    for name in ("test_yesno.jsonl", "test_mc.jsonl", "test_short.jsonl"):
        assert sha(out / name) == sha(small_128.folder / name)
    for p in (out / "images" / "test").iterdir():
        assert sha(p) == sha(small_128.folder / "images" / "test" / p.name)


def test_output_folder_must_be_empty_unless_overwrite(tmp_path):
    out = tmp_path / "b"
    build_benchmark(out, train_per_domain=3, test_per_domain=2)
    before = tree(out)
    with pytest.raises(FileExistsError):
        build_benchmark(out, train_per_domain=3, test_per_domain=2)
    build_benchmark(out, train_per_domain=3, test_per_domain=2, overwrite=True)
    assert tree(out) == before


# -------------------------------------------------------------------------------------------- counts and fields


def test_meta_and_counts(bench):
    meta = bench.meta
    assert meta["version"] >= 1 and meta["seed"] == 0 and meta["image_size"] == DEFAULTS["image_size"] == 112
    assert meta["train_per_domain"] == 600 and meta["test_per_domain"] == 100
    assert meta["params_hash"] == params_hash()
    assert meta["domains"] == list(DOMAINS) == ["scenes", "documents", "charts"]
    assert len(bench.train) == 3 * 600 and len({r["id"] for r in bench.train}) == len(bench.train)
    for domain in DOMAINS:
        c = meta["counts"]
        assert c["train"][domain] == {"questions": 600, "images": 200, "yesno": 200, "mc": 200, "short": 200}
        assert c["test"][domain] == {"images": 100, "yesno": 100, "mc": 400, "mc_questions": 100, "short": 100}
        assert sum(r["domain"] == domain for r in bench.yesno) == 100
        assert sum(r["domain"] == domain for r in bench.short) == 100
        assert sum(r["domain"] == domain for r in bench.mc) == 400
        assert sum(r["id"].startswith(domain + "-") for r in bench.train) == 600
    assert meta["files"] == {name: sha(bench.folder / name) for name in meta["files"]}


def test_record_fields(bench):
    common = {"question_id", "image", "text", "answer", "domain", "format", "category", "question"}
    for fmt, rows in (("yesno", bench.yesno), ("mc", bench.mc), ("short", bench.short)):
        ids = [r["question_id"] for r in rows]
        assert len(set(ids)) == len(ids)
        for r in rows:
            assert common <= set(r) and r["format"] == fmt and r["domain"] in DOMAINS
            assert r["category"] in DOMAINS[r["domain"]].CATEGORIES[fmt]
            assert "<image>" not in r["text"]  # evaluation prepends the image placeholder itself
            question, options, suffix = split_prompt(r["text"])
            assert question == r["question"]
            if fmt == "mc":
                assert suffix == MC_SUFFIX and options == [r[x] for x in LETTERS]
                assert r["answer"] in LETTERS and isinstance(r["index"], int) and r["rotation"] in range(4)
                assert r["options"] == {x: r[x] for x in LETTERS} and len(set(options)) == 4
            else:
                assert suffix == SHORT_SUFFIX and options is None
            if fmt == "yesno":
                assert r["answer"] in ("yes", "no")
            if fmt == "short":
                assert r["answers"] == [r["answer"]] * 10
                assert r["answer_type"] == ("number" if r["answer"].isdigit() else "other")
                assert r["answer"] and len(r["answer"].split()) == 1  # one word or number
    for r in bench.train:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"]
        assert set(r) == {"id", "image", "conversations"}


def test_train_mixes_all_formats(bench):
    suffixes = Counter(split_prompt(r["conversations"][0]["value"])[2] for r in bench.train)
    assert suffixes[MC_SUFFIX] == 600 and suffixes[SHORT_SUFFIX] == 1200
    answers = Counter(r["conversations"][1]["value"] for r in bench.train)
    assert answers["yes"] > 250 and answers["no"] > 250
    letters = [answers[x] for x in LETTERS]
    assert min(letters) > 100  # the correct letter is spread over A-D


def test_files_load_with_the_library_loaders(bench):
    from vlweave.data.llava_json import load_llava_data
    from vlweave.data.questions import read_questions

    samples = load_llava_data(bench.folder / "train.json")
    assert len(samples) == len(bench.train) and all(Path(s.image).is_file() for s in samples)
    for name in ("test_yesno.jsonl", "test_mc.jsonl", "test_short.jsonl"):
        questions = read_questions(bench.folder / name)
        assert all(Path(q.image).is_file() for q in questions)


def test_yesno_is_balanced(bench):
    per_domain = Counter((r["domain"], r["answer"]) for r in bench.yesno)
    per_category = Counter((r["domain"], r["category"], r["answer"]) for r in bench.yesno)
    for domain in DOMAINS:
        assert per_domain[domain, "yes"] == per_domain[domain, "no"] == 50
        for category in DOMAINS[domain].CATEGORIES["yesno"]:
            assert per_category[domain, category, "yes"] == per_category[domain, category, "no"] > 0
    assert bench.meta["yesno_yes"] == {d: 50 for d in DOMAINS}


def test_mc_every_rotation_present_and_answer_letter_consistent(bench):
    groups: dict[int, list[dict]] = defaultdict(list)
    for r in bench.mc:
        assert r["index"] == r["circular_group"] + r["rotation"] * CIRCULAR_OFFSET  # MMBench's numbering
        assert r["index"] % CIRCULAR_OFFSET == r["circular_group"]
        groups[r["circular_group"]].append(r)
    assert len(groups) == 300 and sorted(groups) == list(range(300))
    assert len({r["index"] for r in bench.mc}) == len(bench.mc)
    for group, rows in groups.items():
        rows.sort(key=lambda r: r["rotation"])
        assert [r["rotation"] for r in rows] == [0, 1, 2, 3] and rows[0]["index"] == group
        assert len({(r["image"], r["question"], r["domain"], r["category"]) for r in rows}) == 1
        base = [rows[0][x] for x in LETTERS]
        correct = {r[r["answer"]] for r in rows}
        assert len(correct) == 1  # the letter always points at the same option text
        assert sorted(r["answer"] for r in rows) == list(LETTERS)  # each letter is right once over the rotations
        for k, r in enumerate(rows):
            assert [r[x] for x in LETTERS] == base[k:] + base[:k]
            assert rotate_mc(rows[0], k) == r  # the public helper reproduces the stored rotations


# ----------------------------------------------------------------------------- answers agree with the images


def test_every_answer_agrees_with_the_spec(bench):
    """Short answers, MC options and yes/no claims, train and test, re-derived by the oracle from the spec."""
    for r in bench.short:
        assert is_right(r["domain"], bench.spec(r["image"]), r["question"], r["answer"]), r
    for r in bench.mc:
        spec = bench.spec(r["image"])
        verdicts = [is_right(r["domain"], spec, r["question"], r[x]) for x in LETTERS]
        assert verdicts == [x == r["answer"] for x in LETTERS], r  # the letter's option and only it is right
    for r in bench.yesno:
        assert ORACLE[r["domain"]][1](bench.spec(r["image"]), r["question"]) == (r["answer"] == "yes"), r
    for r in bench.train:
        domain = r["id"].split("-")[0]
        spec = bench.spec(r["image"])
        question, options, suffix = split_prompt(r["conversations"][0]["value"].removeprefix("<image>\n"))
        answer = r["conversations"][1]["value"]
        if options:
            assert [is_right(domain, spec, question, o) for o in options] == [x == answer for x in LETTERS]
        elif answer in ("yes", "no") and not question.startswith(("What", "Which", "How", "Where")):
            assert ORACLE[domain][1](spec, question) == (answer == "yes")
        else:
            assert is_right(domain, spec, question, answer)


def test_specs_describe_the_pixels(bench, small_128):
    for b in (bench, small_128):
        for rel, entry in b.specs.items():
            img = b.image(rel)
            assert img.size == (b.meta["image_size"],) * 2 and img.mode == "RGB"
            assert DOMAINS[entry["domain"]].render(entry["spec"]).tobytes() == img.convert("RGB").tobytes()


def test_scene_colors_at_shape_centres(bench):
    checked = 0
    for rel, entry in bench.specs.items():
        if entry["domain"] != "scenes":
            continue
        img = bench.image(rel).convert("RGB")
        for o in entry["spec"]["objects"]:
            assert img.getpixel((o["cx"], o["cy"])) == scenes.COLORS[o["color"]]
    for r in bench.short:  # the colour named by the answer is the colour drawn at the shape's centre
        if r["domain"] == "scenes" and (m := re.fullmatch(r"What (?:color is|is the color of) the (\w+)\?",
                                                          r["question"])):
            (o,) = [o for o in bench.spec(r["image"])["objects"] if o["shape"] == m[1]]
            assert bench.image(r["image"]).convert("RGB").getpixel((o["cx"], o["cy"])) == scenes.COLORS[r["answer"]]
            checked += 1
    assert checked > 5


def test_chart_bar_heights_in_pixels(bench):
    """Measure the drawn bars (bar-coloured pixels up each bar's centre column); 'highest' answers follow them."""
    measured: dict[str, dict[str, int]] = {}
    for rel, entry in bench.specs.items():
        if entry["domain"] != "charts":
            continue
        spec = entry["spec"]
        img = bench.image(rel).convert("RGB")
        colour = charts.BAR_COLORS[spec["color"]]
        heights = {}
        for bar, (x0, _, x1, _) in zip(spec["bars"], charts.layout(spec)["boxes"]):
            cx = (x0 + x1) // 2
            heights[bar["label"]] = sum(img.getpixel((cx, y)) == colour for y in range(img.height))
        order_px = sorted(heights, key=heights.get)
        order_spec = [b["label"] for b in sorted(spec["bars"], key=lambda b: b["value"])]
        assert order_px == order_spec and len(set(heights.values())) == len(heights)
        measured[rel] = heights
    checked = 0
    for r in bench.short + bench.yesno:
        if r["domain"] != "charts":
            continue
        heights = measured[r["image"]]
        if m := re.fullmatch(r"Which (?:bar is the|label has the) (highest|lowest|largest|smallest)(?: value)?\?",
                             r["question"]):
            pick = max if m[1] in ("highest", "largest") else min
            assert r["answer"] == pick(heights, key=heights.get)
            assert r["answer"] == (charts.highest if pick is max else charts.lowest)(bench.spec(r["image"]))
            checked += 1
        elif m := re.fullmatch(r"Is the (\w+) bar the (highest|lowest)\?", r["question"]):
            pick = max if m[2] == "highest" else min
            assert (pick(heights, key=heights.get) == m[1]) == (r["answer"] == "yes")
            checked += 1
    assert checked > 10


def test_document_text_is_drawn_on_its_line(bench):
    """Each line's band of the image holds ink; the bands below the last line hold none."""
    for rel, entry in bench.specs.items():
        if entry["domain"] != "documents":
            continue
        spec = entry["spec"]
        img = bench.image(rel).convert("RGB")
        ink = documents.INKS[spec["ink"]]
        paper = documents.PAPERS[spec["paper"]]
        for i, _ in enumerate(spec["lines"]):
            top = spec["y0"] + i * spec["line_height"]
            band = img.crop((0, top + 1, img.width, top + spec["line_height"] - 1))
            diff = ImageChops.difference(band, Image.new("RGB", band.size, paper)).convert("L")
            assert diff.getextrema()[1] > 80, (rel, i)
        assert ink != paper


# ------------------------------------------------------------------------------------------------- no leakage


def test_train_and_test_images_are_distinct(bench):
    by_split: dict[str, set[str]] = {"train": set(), "test": set()}
    pixels: dict[str, set[bytes]] = {"train": set(), "test": set()}
    specs: dict[str, set[str]] = {"train": set(), "test": set()}
    for rel, entry in bench.specs.items():
        split = entry["split"]
        assert rel.startswith(f"images/{split}/")
        by_split[split].add(sha(bench.folder / rel))
        pixels[split].add(hashlib.sha256(bench.image(rel).convert("RGB").tobytes()).digest())
        specs[split].add(json.dumps(entry["spec"], sort_keys=True))
    assert len(by_split["train"]) == 600 and len(by_split["test"]) == 300  # all distinct within a split too
    assert not by_split["train"] & by_split["test"]
    assert not pixels["train"] & pixels["test"] and len(pixels["train"]) == 600
    assert not specs["train"] & specs["test"]
    train_images = {r["image"] for r in bench.train}
    test_images = {r["image"] for r in bench.yesno + bench.mc + bench.short}
    assert not train_images & test_images
    assert train_images | test_images == set(bench.specs)
    on_disk = {p.relative_to(bench.folder).as_posix() for p in (bench.folder / "images").rglob("*.png")}
    assert on_disk == set(bench.specs)


# --------------------------------------------------------------------------------------------- sizes, options


def test_image_size_and_sizes_are_selectable(small_128):
    meta = small_128.meta
    assert meta["image_size"] == 128
    assert len(small_128.train) == 3 * 30 and len(small_128.short) == 3 * 12 and len(small_128.mc) == 4 * 3 * 12
    for rel in small_128.specs:
        assert small_128.image(rel).size == (128, 128)


def test_one_question_per_train_image(tmp_path):
    meta = build_benchmark(tmp_path / "b", train_per_domain=10, test_per_domain=2, train_questions_per_image=1,
                           domains=["charts"])
    assert meta["domains"] == ["charts"]
    assert meta["counts"]["train"]["charts"]["images"] == 10
    train = json.loads((tmp_path / "b" / "train.json").read_text())
    assert len({r["image"] for r in train}) == 10


def test_bad_parameters_are_rejected(tmp_path):
    with pytest.raises(ValueError):
        build_benchmark(tmp_path / "x", domains=["maps"])
    with pytest.raises(ValueError):
        build_benchmark(tmp_path / "x", train_questions_per_image=4)
    with pytest.raises(TypeError):
        params_hash(seeds=3)


# ------------------------------------------------------------------------------------------------ cached asset


def test_prepare_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLWEAVE_CACHE", str(tmp_path / "cache"))
    params = {"train_per_domain": 6, "test_per_domain": 4}
    assert not is_prepared(**params)
    folder = prepare_benchmark(**params)
    assert folder == tmp_path / "cache" / "synthetic" / params_hash(**params)
    assert is_prepared(**params) and (folder / "meta.json").is_file()
    assert json.loads((folder / "meta.json").read_text())["content_hash"] == content_hash(folder)
    stamp = (folder / "train.json").stat().st_mtime_ns

    import vlweave.data.synthetic.build as build_module

    def fail(*a, **k):
        raise AssertionError("rebuilt a prepared benchmark")

    monkeypatch.setattr(build_module, "build_benchmark", fail)
    assert prepare_benchmark(**params) == folder
    assert prepare_from_name("synthetic@train_per_domain=6, test_per_domain=4") == folder
    assert (folder / "train.json").stat().st_mtime_ns == stamp
    assert params_hash(**params) != params_hash(train_per_domain=6, test_per_domain=4, seed=1)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".") and p.name != ".locks"]
    with pytest.raises(ValueError):
        prepare_from_name("synthetic@sead=1")
