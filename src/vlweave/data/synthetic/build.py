"""Build the synthetic multi-domain benchmark (scenes, documents, charts) and cache it like an asset.

Layout of a built benchmark folder::

    train.json          LLaVA JSON, one question per record, yes/no + multiple-choice + short-answer mixed
    test_yesno.jsonl    POPE-style yes/no questions (balanced yes/no per domain and per category)
    test_mc.jsonl       MMBench-style multiple choice, every circular rotation written as its own record
                        (``index`` = ``circular_group + rotation * 10**6`` as in MMBench's circular TSVs)
    test_short.jsonl    VQA-style short answers, with an ``answers`` list of 10 copies for VQA accuracy
    specs.json          image path -> {domain, split, spec}: the generator's description of every image
    meta.json           seed, sizes, counts, version, parameter hash and content hash
    images/{train,test}/<domain>-<n>.png

Everything is drawn from ``random.Random`` instances seeded with strings derived from the seed, the domain and the
split (so each stream is independent of the others and of PYTHONHASHSEED); the same parameters give byte-identical
files for a given Pillow build.  The test split of a domain is generated first and the train split never reuses a
test image (same spec or same pixels), so no train image leaks a test answer.  The test split depends only on the
seed, the image size and ``test_per_domain``, not on the size of the train split.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import PIL

from vlweave.data.synthetic import charts, documents, scenes
from vlweave.data.synthetic.common import FORMATS, LETTERS, MC_SUFFIX, SHORT_SUFFIX, Fact

VERSION = 1
NAME = "synthetic"
MARKER = ".vlweave-asset.json"

DOMAINS: dict[str, ModuleType] = {"scenes": scenes, "documents": documents, "charts": charts}

DEFAULTS: dict = {"seed": 0, "train_per_domain": 600, "test_per_domain": 100, "image_size": 112,
                  "train_questions_per_image": 3}

TEST_FILES = {"yesno": "test_yesno.jsonl", "mc": "test_mc.jsonl", "short": "test_short.jsonl"}
OUTPUT_FILES = ("train.json", *TEST_FILES.values(), "specs.json", "meta.json")

_MAX_ATTEMPTS = 10_000
#: MMBench's circular copies of question ``g`` are numbered ``g + k * CIRCULAR_OFFSET``
CIRCULAR_OFFSET = 1_000_000
N_VQA_ANSWERS = 10


# ------------------------------------------------------------------------------------------------ question text


def yesno_text(question: str) -> str:
    return f"{question}\n{SHORT_SUFFIX}"


def short_text(question: str) -> str:
    return f"{question}\n{SHORT_SUFFIX}"


def mc_text(question: str, options: Sequence[str]) -> str:
    """MMBench prompt as LLaVA's ``model_vqa_mmbench`` builds it: question, "A. ..." lines, then the instruction."""
    lines = [question] + [f"{letter}. {opt}" for letter, opt in zip(LETTERS, options)]
    return "\n".join(lines + [MC_SUFFIX])


def rotate_mc(record: dict, k: int) -> dict:
    """Rotation ``k`` (0-3) of a rotation-0 multiple-choice record, as circular evaluation shifts the options.

    The options move left by ``k`` (LLaVA's ``options[1:] + options[:1]`` applied k times) and the answer letter
    follows its option.  As in MMBench's circular TSVs, rotation ``k`` of question ``g`` has ``index`` =
    ``g + k * 10**6`` (so ``index % 10**6`` groups the copies); ``circular_group`` holds ``g`` for all of them.
    ``question_id`` gets ``-r{k}``; the options are written both as fields ``A``..``D`` and as ``options``.
    """
    options = [record[letter] for letter in LETTERS]
    correct = options[LETTERS.index(record["answer"])]
    rotated = options[k:] + options[:k]
    group = int(record.get("circular_group", int(record["index"]) % CIRCULAR_OFFSET))
    base_id = re.sub(r"-r\d+$", "", str(record["question_id"]))
    out = {**record, "question_id": f"{base_id}-r{k}", "text": mc_text(record["question"], rotated),
           "answer": LETTERS[rotated.index(correct)], "index": group + k * CIRCULAR_OFFSET,
           "circular_group": group, "rotation": k}
    out.update(zip(LETTERS, rotated))
    out["options"] = dict(zip(LETTERS, rotated))
    return out


def _realise(fact: Fact, fmt: str, rng: random.Random, *, want_yes: bool = True) -> dict:
    """The question of ``fact`` in format ``fmt``: {question, text, answer[, options]}."""
    if fmt == "short":
        return {"question": fact.question, "text": short_text(fact.question), "answer": fact.answer}
    if fmt == "yesno":
        assert fact.claim is not None
        wrong = fact.no_values if fact.no_values is not None else fact.distractors
        value = fact.answer if want_yes else rng.choice(wrong[:3])
        question = fact.claim(value)
        return {"question": question, "text": yesno_text(question), "answer": "yes" if want_yes else "no"}
    if fmt == "mc":
        options = list(fact.distractors[:3])
        pos = rng.randrange(4)
        options.insert(pos, fact.answer)
        return {"question": fact.question, "text": mc_text(fact.question, options), "answer": LETTERS[pos],
                "options": options}
    raise ValueError(f"unknown format {fmt!r}")


# -------------------------------------------------------------------------------------------------- generation


def _rng(seed: int, domain: str, split: str) -> random.Random:
    return random.Random(f"vlweave.synthetic/v{VERSION}/seed={seed}/{domain}/{split}")


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class _Domain:
    """Draws images of one domain whose spec and pixels were never used before in this build."""

    def __init__(self, name: str, size: int) -> None:
        self.name, self.module, self.size = name, DOMAINS[name], size
        self.used_specs: set[str] = set()
        self.used_pixels: set[str] = set()

    def draw(self, rng: random.Random, wanted: list[tuple[str, str]]) -> tuple[dict, list[Fact], bytes]:
        """A fresh spec with a fact for every (format, category) of ``wanted``, its facts and its PNG bytes."""
        for _ in range(_MAX_ATTEMPTS):
            spec = self.module.make_spec(rng, self.size)
            key = json.dumps(spec, sort_keys=True)
            if key in self.used_specs:
                continue
            facts = []
            for fmt, category in wanted:
                fact = self.module.fact(spec, category, fmt, rng)
                if fact is None or not fact.supports(fmt):
                    break
                facts.append(fact)
            else:
                img = self.module.render(spec)
                pixels = hashlib.sha256(img.tobytes()).hexdigest()
                if pixels in self.used_pixels:
                    continue
                self.used_specs.add(key)
                self.used_pixels.add(pixels)
                return spec, facts, _png(img)
        raise RuntimeError(f"{self.name}: no new image with questions {wanted} after {_MAX_ATTEMPTS} attempts")


class _Categories:
    """Round-robin categories per format; yes/no questions come in yes/no pairs so both are balanced."""

    def __init__(self, module: ModuleType) -> None:
        self.cats = module.CATEGORIES
        self.counts = dict.fromkeys(FORMATS, 0)

    def next(self, fmt: str) -> tuple[str, bool]:
        n = self.counts[fmt]
        self.counts[fmt] += 1
        cats = self.cats[fmt]
        if fmt == "yesno":
            return cats[(n // 2) % len(cats)], n % 2 == 0
        return cats[n % len(cats)], True


def _test_split(dom: _Domain, seed: int, count: int, index0: int, images: dict[str, bytes],
                specs: dict[str, dict], tests: dict[str, list[dict]]) -> None:
    rng = _rng(seed, dom.name, "test")
    cats = _Categories(dom.module)
    for i in range(count):
        plan = [(fmt, *cats.next(fmt)) for fmt in FORMATS]
        spec, facts, png = dom.draw(rng, [(fmt, cat) for fmt, cat, _ in plan])
        image = f"images/test/{dom.name}-{i:05d}.png"
        images[image] = png
        specs[image] = {"domain": dom.name, "split": "test", "spec": spec}
        for (fmt, category, want_yes), fact in zip(plan, facts):
            q = _realise(fact, fmt, rng, want_yes=want_yes)
            base = {"question_id": f"{dom.name}-{fmt}-{i:05d}", "image": image, "text": q["text"],
                    "answer": q["answer"], "domain": dom.name, "format": fmt, "category": category,
                    "question": q["question"]}
            if fmt == "short":
                answer_type = "number" if q["answer"].isdigit() else "other"  # VQAv2's answer types
                tests[fmt].append({**base, "answer_type": answer_type, "answers": [q["answer"]] * N_VQA_ANSWERS})
            elif fmt == "yesno":
                tests[fmt].append(base)
            else:
                record = {**base, "index": index0 + i, **dict(zip(LETTERS, q["options"]))}
                tests[fmt].extend(rotate_mc(record, k) for k in range(len(LETTERS)))


def _train_split(dom: _Domain, seed: int, count: int, per_image: int, images: dict[str, bytes],
                 specs: dict[str, dict], train: list[dict]) -> dict:
    rng = _rng(seed, dom.name, "train")
    cats = _Categories(dom.module)
    n_images = math.ceil(count / per_image) if count else 0
    per_format = dict.fromkeys(FORMATS, 0)
    for j in range(n_images):
        fmts = [FORMATS[t % len(FORMATS)] for t in range(j * per_image, min(count, (j + 1) * per_image))]
        plan = [(fmt, *cats.next(fmt)) for fmt in fmts]
        spec, facts, png = dom.draw(rng, [(fmt, cat) for fmt, cat, _ in plan])
        image = f"images/train/{dom.name}-{j:05d}.png"
        images[image] = png
        specs[image] = {"domain": dom.name, "split": "train", "spec": spec}
        for (fmt, _category, want_yes), fact in zip(plan, facts):
            q = _realise(fact, fmt, rng, want_yes=want_yes)
            per_format[fmt] += 1
            train.append({"id": f"{dom.name}-{j:05d}-{fmt}", "image": image,
                          "conversations": [{"from": "human", "value": "<image>\n" + q["text"]},
                                            {"from": "gpt", "value": q["answer"]}]})
    return {"questions": count, "images": n_images, **per_format}


# -------------------------------------------------------------------------------------------------- parameters


def normalize_params(**params) -> dict:
    """The full parameter set (defaults filled in, validated), as stored in meta.json and hashed for the cache."""
    unknown = set(params) - set(DEFAULTS) - {"domains"}
    if unknown:
        raise TypeError(f"unknown benchmark parameter(s): {sorted(unknown)}")
    out = {**DEFAULTS, **{k: v for k, v in params.items() if k != "domains"}}
    for key in DEFAULTS:
        if isinstance(out[key], bool) or not isinstance(out[key], int):
            raise TypeError(f"{key} must be an integer, got {out[key]!r}")
    if out["train_per_domain"] < 0 or out["test_per_domain"] < 0:
        raise ValueError("train_per_domain and test_per_domain must be >= 0")
    if not 1 <= out["train_questions_per_image"] <= len(FORMATS):
        raise ValueError(f"train_questions_per_image must be 1..{len(FORMATS)} (one question per format per image)")
    if out["image_size"] < 32:
        raise ValueError(f"image_size must be >= 32 px, got {out['image_size']}")
    domains = params.get("domains") or tuple(DOMAINS)
    domains = [domains] if isinstance(domains, str) else list(domains)
    bad = [d for d in domains if d not in DOMAINS]
    if bad or len(set(domains)) != len(domains) or not domains:
        raise ValueError(f"domains must be distinct names out of {list(DOMAINS)}, got {domains}")
    out["domains"] = [d for d in DOMAINS if d in domains]  # canonical order
    return out


def params_hash(**params) -> str:
    """16 hex digits identifying a benchmark (its version and parameters): the name of its cache folder."""
    p = normalize_params(**params)
    blob = json.dumps({"name": NAME, "version": VERSION, **p}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _hash_files(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{hashlib.sha256(files[rel]).hexdigest()}\n".encode())
    return h.hexdigest()


def content_hash(folder: str | Path) -> str:
    """sha256 over every file of a built folder except meta.json and the cache marker (relative path + file hash,
    in sorted order): equals meta.json's ``content_hash`` when nothing was added, removed or changed."""
    folder = Path(folder)
    return _hash_files({p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
                        if p.is_file() and p.name not in ("meta.json", MARKER)})


# -------------------------------------------------------------------------------------------------------- build


def _dump_json(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=1) + "\n").encode()


def _dump_jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def build_benchmark(out_dir: str | Path, *, seed: int = DEFAULTS["seed"],
                    train_per_domain: int = DEFAULTS["train_per_domain"],
                    test_per_domain: int = DEFAULTS["test_per_domain"],
                    image_size: int = DEFAULTS["image_size"],
                    train_questions_per_image: int = DEFAULTS["train_questions_per_image"],
                    domains: Sequence[str] | None = None, overwrite: bool = False) -> dict:
    """Generate the benchmark into ``out_dir`` (created; must be empty unless ``overwrite``).

    Returns the contents of meta.json plus ``build_seconds`` (which is not written, so that builds are identical).

    ``train_per_domain`` training questions per domain, ``train_questions_per_image`` of them (1-3, each of a
    different format) per image; ``test_per_domain`` test images per domain, each asked one question per format
    (so that many yes/no, short-answer and multiple-choice questions; the MC file holds 4 rotations of each).
    """
    params = normalize_params(seed=seed, train_per_domain=train_per_domain, test_per_domain=test_per_domain,
                              image_size=image_size, train_questions_per_image=train_questions_per_image,
                              domains=domains)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty (pass overwrite=True to replace a previous build)")
        for name in OUTPUT_FILES + (MARKER,):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "images", ignore_errors=True)
    t0 = time.perf_counter()
    images: dict[str, bytes] = {}
    specs: dict[str, dict] = {}
    tests: dict[str, list[dict]] = {fmt: [] for fmt in FORMATS}
    train: list[dict] = []
    counts: dict = {"train": {}, "test": {}}
    for d, name in enumerate(params["domains"]):
        dom = _Domain(name, params["image_size"])
        # test first: the train split then avoids every test image
        before = {fmt: len(rows) for fmt, rows in tests.items()}
        _test_split(dom, params["seed"], params["test_per_domain"], d * params["test_per_domain"], images, specs,
                    tests)
        counts["test"][name] = {"images": params["test_per_domain"],
                                **{fmt: len(tests[fmt]) - before[fmt] for fmt in FORMATS}}
        counts["test"][name]["mc_questions"] = counts["test"][name]["mc"] // len(LETTERS)
        counts["train"][name] = _train_split(dom, params["seed"], params["train_per_domain"],
                                             params["train_questions_per_image"], images, specs, train)

    (out / "images" / "train").mkdir(parents=True, exist_ok=True)
    (out / "images" / "test").mkdir(parents=True, exist_ok=True)
    for rel, data in images.items():
        (out / rel).write_bytes(data)
    files = {"train.json": _dump_json(train), "specs.json": _dump_json(specs)}
    files.update({TEST_FILES[fmt]: _dump_jsonl(rows) for fmt, rows in tests.items()})
    for name, data in files.items():
        (out / name).write_bytes(data)

    yes = {name: sum(r["answer"] == "yes" for r in tests["yesno"] if r["domain"] == name) for name in params["domains"]}
    meta = {
        "name": NAME,
        "version": VERSION,
        **params,
        "params_hash": params_hash(**params),
        "formats": list(FORMATS),
        "categories": {name: {fmt: list(DOMAINS[name].CATEGORIES[fmt]) for fmt in FORMATS}
                       for name in params["domains"]},
        "counts": counts,
        "totals": {"train_questions": len(train), "train_images": sum(c["images"] for c in counts["train"].values()),
                   "test_images": sum(c["images"] for c in counts["test"].values()),
                   **{f"test_{fmt}_records": len(rows) for fmt, rows in tests.items()}},
        "yesno_yes": yes,
        "mc_rotations": ("test_mc.jsonl holds all 4 rotations of every question: index = circular_group + "
                         "rotation * 10**6, as in MMBench's circular TSVs"),
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
        "pillow": PIL.__version__,
        "content_hash": _hash_files({**images, **files}),
    }
    (out / "meta.json").write_bytes(_dump_json(meta))
    meta["build_seconds"] = round(time.perf_counter() - t0, 2)  # returned only, not written: files stay identical
    return meta


# ------------------------------------------------------------------------------------------------- cache/asset


def benchmark_dir(**params) -> Path:
    """Where :func:`prepare_benchmark` keeps the benchmark with these parameters (prepared or not)."""
    from vlweave.assets import cache_dir

    return cache_dir() / NAME / params_hash(**params)


def _marker_record(params: dict) -> dict:
    return {"name": NAME, "version": VERSION, "params": normalize_params(**params)}


def is_prepared(**params) -> bool:
    """True when the cache folder for these parameters was completed by the current generator version."""
    try:
        record = json.loads((benchmark_dir(**params) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    expected = _marker_record(params)
    return all(record.get(k) == v for k, v in expected.items())


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare_benchmark(*, force: bool = False, **params) -> Path:
    """The benchmark's folder under ``assets.cache_dir()/synthetic/<params hash>/``, built first if missing.

    Takes :func:`build_benchmark`'s keyword parameters (defaults: :data:`DEFAULTS`).  Safe to call from several
    processes at once: the build runs under a file lock in a temp folder that is moved into place when complete.
    """
    target = benchmark_dir(**params)
    if not force and is_prepared(**params):
        return target
    root = target.parent
    with _lock(root / ".locks" / f"{target.name}.lock"):
        if not force and is_prepared(**params):
            return target
        for stale in root.glob(f".{target.name}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        build = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=root))
        try:
            meta = build_benchmark(build, **params)
            record = {**_marker_record(params), "content_hash": meta["content_hash"],
                      "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": meta["build_seconds"]}
            (build / MARKER).write_text(json.dumps(record, indent=2) + "\n")
            build.chmod(0o755)
            if target.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.trash-", dir=root))
                os.replace(target, trash / "old")
                os.replace(build, target)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(build, target)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    return target


def prepare_from_name(name: str) -> Path:
    """Resolve an asset-style name: ``"synthetic"`` (defaults) or ``"synthetic@seed=1,image_size=128,..."``.

    Parameter keys are :data:`DEFAULTS`' names with integer values, and ``domains=scenes+charts``.  ``@`` (not
    ``:``) separates them because data paths are written ``asset:relative/file`` (``synthetic@seed=1:train.json``).
    """
    base, _, rest = name.partition("@")
    if base != NAME:
        raise ValueError(f"not a synthetic benchmark name: {name!r}")
    params: dict = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"{name!r}: expected key=value, got {item!r}")
        if key == "domains":
            params[key] = [d for d in value.strip().split("+") if d]
        elif key in DEFAULTS:
            try:
                params[key] = int(value)
            except ValueError:
                raise ValueError(f"{name!r}: {key} must be an integer, got {value!r}") from None
        else:
            raise ValueError(f"{name!r}: unknown parameter {key!r}; known: {sorted(DEFAULTS)} and domains")
    return prepare_benchmark(**params)
