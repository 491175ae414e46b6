"""Text oracle for the demo: SmolLM2-135M-Instruct + LoRA with the image replaced by its *true caption as text*.

Why: the demo's yes/no accuracy sits exactly at the blind per-template prior (docs/demo.md).  This script asks
whether the language model can learn the comparison at all when perception is perfect: every training and test
question is shown after the image's caption ("red circle") in place of the visual tokens, trained with the
demo's LoRA settings (r16 on every attention/MLP projection, batch 32, AdamW, warmup-free cosine schedule) and
scored on the demo's own 600 test questions (greedy, normalised exact match).

Captions are read from the pixels (the fill colour and the outline's geometry) and checked against every fact the
image's own QA turns establish, test images included: this is an upper bound on perception, not a model.

    python experiments/easyvqa_text_oracle.py --steps 70                      # natural data, the demo's budget
    python experiments/easyvqa_text_oracle.py --data train_balanced.json --yes-no-only --steps 300

Needs the offline assets (``vlweave assets pull smollm2-135m-instruct easy-vqa``).  CPU: ~6 s per step.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlweave import assets
from vlweave.data.easyvqa import _facts_from_turns, add_question_types, question_type
from vlweave.eval.runner import load_eval_questions
from vlweave.eval.vqa import exact_match_report
from vlweave.processing import IGNORE_INDEX

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# easy-vqa draws one shape, filled with one of these exact colours, on a tinted near-white background.
PALETTE = {(255, 0, 0): "red", (0, 255, 0): "green", (0, 0, 255): "blue", (0, 0, 0): "black",
           (128, 128, 128): "gray", (0, 128, 128): "teal", (165, 42, 42): "brown", (255, 255, 0): "yellow"}


def pixel_facts(path: Path) -> tuple[str, str]:
    """Colour and shape read from the pixels: the fill is the second most common colour; a triangle is far from
    mirror-symmetric in its bounding box (IoU with its flip <= 0.53, circles >= 0.85) and a rectangle fills its box
    (>= 0.97 of it, circles <= 0.94): measured on the easy-vqa images whose QA turns name their shape."""
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    fill = colours[np.argsort(counts)[-2]]
    color = PALETTE.get(tuple(int(v) for v in fill))
    if color is None:
        raise ValueError(f"{path}: fill colour {tuple(fill)} is not in the easy-vqa palette")
    mask = (np.abs(pixels.astype(int) - fill.astype(int)).sum(1) <= 60).reshape(64, 64)
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    symmetry = min((box & box[::-1]).sum() / (box | box[::-1]).sum(),
                   (box & box[:, ::-1]).sum() / (box | box[:, ::-1]).sum())
    shape = "triangle" if symmetry < 0.7 else "rectangle" if box.mean() > 0.955 else "circle"
    return color, shape


def captions(path: Path) -> dict[str, str]:
    """image path (as in the LLaVA JSON) -> "colour shape", read from the pixels.

    The image's QA turns alone leave the colour or the shape unknown for ~22 % of the images (only "no" answers
    about it), so they are used as a check: every fact they do establish must agree with the pixels."""
    out = {}
    for rec in tqdm(json.loads(path.read_text()), desc=f"captions {path.name}", unit="image"):
        color, shape = pixel_facts(path.parent / rec["image"])
        for said, seen in zip(_facts_from_turns(rec["conversations"]), (color, shape)):
            if said is not None and said != seen:
                raise ValueError(f"{path} record {rec['id']}: pixels say {seen!r}, its QA turns say {said!r}")
        out[rec["image"]] = f"{color} {shape}"
    return out


def prompt(tokenizer, caption: str, question: str) -> str:
    """ChatML, no system prompt (as the demo), caption text where the demo puts its visual tokens."""
    messages = [{"role": "user", "content": f"{caption}\n{question}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="train_single.json", help="easy-vqa training file (single-turn QA)")
    ap.add_argument("--yes-no-only", action="store_true", help="train on the yes/no questions only")
    ap.add_argument("--steps", type=int, default=70)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the log and accuracies here (JSON)")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    lm_dir, vqa_dir = assets.pull("smollm2-135m-instruct"), Path(assets.pull("easy-vqa")).resolve()
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    model = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS))
    lm = model.get_base_model()  # the LoRA-wrapped causal LM: its decoder and head, called separately below

    train_caps, test_caps = captions(vqa_dir / "train.json"), captions(vqa_dir / "test.json")
    records = json.loads((vqa_dir / args.data).read_text())
    if args.yes_no_only:
        records = [r for r in records if question_type(r["conversations"][1]["value"]) == "yes/no"]
    random.Random(args.seed).shuffle(records)
    if args.steps * args.batch_size > len(records):
        raise SystemExit(f"{args.data}: {len(records)} records, fewer than {args.steps} x {args.batch_size}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    end = tokenizer("<|im_end|>", add_special_tokens=False).input_ids
    log = []
    model.train()
    for step in tqdm(range(args.steps), desc="text oracle", unit="step"):
        ids, labels, answer_mask = [], [], []
        for rec in records[step * args.batch_size:(step + 1) * args.batch_size]:
            question = rec["conversations"][0]["value"].replace("<image>", "").strip()
            p = tokenizer(prompt(tokenizer, train_caps[rec["image"]], question), add_special_tokens=False).input_ids
            a = tokenizer(rec["conversations"][1]["value"], add_special_tokens=False).input_ids
            ids.append(p + a + end)
            labels.append([IGNORE_INDEX] * len(p) + a + end)  # as the demo: the answer, then <|im_end|> (to stop)
            answer_mask.append([False] * len(p) + [True] * len(a) + [False] * len(end))
        length = max(map(len, ids))
        pad = tokenizer.pad_token_id or 0
        input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in ids])
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in ids])
        target = torch.tensor([r + [IGNORE_INDEX] * (length - len(r)) for r in labels])
        # LM head only where a label is (vocab 49k: full logits would double the step), as vlweave's model does.
        hidden = lm.model(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :-1]
        supervised = target[:, 1:] != IGNORE_INDEX
        token_loss = torch.nn.functional.cross_entropy(lm.lm_head(hidden[supervised]), target[:, 1:][supervised],
                                                       reduction="none")
        loss = token_loss.mean()
        # Logged: the loss of the answer tokens alone (<|im_end|> is learnt at once and would halve the average).
        is_answer = torch.tensor([m + [False] * (length - len(m)) for m in answer_mask])[:, 1:][supervised]
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        log.append(token_loss[is_answer].mean().item())
        if args.log_every and (step + 1) % args.log_every == 0:
            tqdm.write(f"step {step + 1}: answer-token loss {sum(log[-args.log_every:]) / args.log_every:.3f}")

    questions = load_eval_questions("easy-vqa:test_qa.jsonl", None, 600, 0)  # the demo's 600
    model.eval()
    tokenizer.padding_side = "left"
    answers: list[str] = []
    with torch.no_grad():
        for i in tqdm(range(0, len(questions), 50), desc="eval", unit="batch"):
            batch = questions[i:i + 50]
            texts = [prompt(tokenizer, test_caps[Path(q.image).relative_to(vqa_dir).as_posix()], q.text)
                     for q in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=4, do_sample=False)
            answers += tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    add_question_types(questions)
    report = exact_match_report(questions, answers, group_key="type")
    result = {k: v["accuracy"] for k, v in report["by_type"].items()} | {"all": report["accuracy"]}
    for k, v in result.items():
        print(f"{k:8s} {v:.3f}")
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "loss": log,
                                        "accuracy": result}, indent=1))


if __name__ == "__main__":
    main()
