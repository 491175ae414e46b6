"""Text oracle for the demo: SmolLM2-135M-Instruct + LoRA with the image replaced by its *true caption as text*.

Why: the demo's yes/no accuracy sits exactly at the blind per-template prior (docs/demo.md).  This script asks
whether the language model can learn the comparison at all when perception is perfect: every training and test
question is shown after the image's caption ("red circle") in place of the visual tokens, trained with the
demo's LoRA settings (r16 on every attention/MLP projection, batch 32, AdamW, warmup-free cosine schedule) and
scored on the demo's own 600 test questions (greedy, normalised exact match).

Captions come from each image's own QA turns (``vlweave.data.easyvqa``), test captions included: this is an upper
bound on perception, not a model.

    python experiments/easyvqa_text_oracle.py --steps 70                      # natural data, the demo's budget
    python experiments/easyvqa_text_oracle.py --data train_balanced.json --yes-no-only --steps 300

Needs the offline assets (``vlweave assets pull smollm2-135m-instruct easy-vqa``).  CPU: ~6 s per step.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import defaultdict
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlweave import assets
from vlweave.data.easyvqa import _facts_from_turns, question_type
from vlweave.eval.runner import load_eval_questions
from vlweave.eval.vqa import normalize_answer

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def captions(path: Path) -> dict[str, str]:
    """image path (as in the LLaVA JSON) -> "colour shape", from that image's own QA turns."""
    out = {}
    for rec in json.loads(path.read_text()):
        color, shape = _facts_from_turns(rec["conversations"])
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
    lm_dir, vqa_dir = assets.pull("smollm2-135m-instruct"), assets.pull("easy-vqa")
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
            labels.append([-100] * len(p) + a + end)  # as the demo: the answer, then <|im_end|> (to stop)
            answer_mask.append([False] * len(p) + [True] * len(a) + [False] * len(end))
        length = max(map(len, ids))
        pad = tokenizer.pad_token_id or 0
        input_ids = torch.tensor([r + [pad] * (length - len(r)) for r in ids])
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in ids])
        target = torch.tensor([r + [-100] * (length - len(r)) for r in labels])
        # LM head only where a label is (vocab 49k: full logits would double the step), as vlweave's model does.
        hidden = lm.model(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :-1]
        supervised = target[:, 1:] != -100
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
    hits: dict[str, list[bool]] = defaultdict(list)
    with torch.no_grad():
        for i in tqdm(range(0, len(questions), 50), desc="eval", unit="batch"):
            batch = questions[i:i + 50]
            texts = [prompt(tokenizer, test_caps["images/" + q["image"].split("images/")[-1]], q["text"]) for q in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=4, do_sample=False)
            for q, row in zip(batch, out):
                pred = tokenizer.decode(row[enc.input_ids.shape[1]:], skip_special_tokens=True)
                hits[question_type(q["answer"])].append(normalize_answer(pred) == normalize_answer(q["answer"]))
    result = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    result["all"] = sum(sum(v) for v in hits.values()) / len(questions)
    for k, v in result.items():
        print(f"{k:8s} {v:.3f}")
    if args.out is not None:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "loss": log,
                                        "accuracy": result}, indent=1))


if __name__ == "__main__":
    main()
