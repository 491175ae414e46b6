"""``vlweave demo | train | eval | chat | assets`` — the command line.

Errors a user can fix (bad config, bad data record, missing file) are printed as one clear line, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlweave import __version__


def _cmd_assets(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from vlweave import assets

    if args.action == "list":
        table = Table(title=f"offline assets (cache: {assets.cache_dir()})")
        for col in ("name", "kind", "prepared", "package", "description"):
            table.add_column(col)
        for a in assets.list_assets():
            table.add_row(a["name"], a["kind"], "yes" if a["prepared"] else "no", a["package"], a["description"])
        Console().print(table)
        return 0
    names = args.names or list(assets.ASSETS)
    for name in names:
        print(f"{name}: {assets.pull(name, force=args.force)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vlweave.demo import run_demo

    run_demo(args.set, output_dir=args.output, config=args.config)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from vlweave.compare import compare

    seeds = list(range(args.seeds)) if args.seed_list is None else args.seed_list
    compare(args.configs, seeds, args.output, overrides=args.set)
    print(f"results: {Path(args.output) / 'compare.json'}, chart: {Path(args.output) / 'compare.png'}", file=sys.stderr)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from vlweave.config import RunConfig
    from vlweave.presets import preset_path
    from vlweave.train.trainer import Trainer

    overrides = list(args.set)
    if args.output:
        overrides.append(f"train.output_dir={args.output}")
    if args.resume:
        # A resumed run uses the configuration it was started with.
        cfg = RunConfig.load(Path(args.resume) / "config.yaml", overrides) if (Path(args.resume) / "config.yaml").exists() \
            else RunConfig.load(preset_path(args.config), overrides)
    else:
        cfg = RunConfig.load(preset_path(args.config), overrides)
    trainer = Trainer(cfg)
    summary = trainer.train(resume=args.resume)
    print(json.dumps({"run_dir": str(trainer.run_dir), "final": str(trainer.run_dir / "final"), **summary}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from vlweave.builder import load_checkpoint, load_processor
    from vlweave.eval.runner import evaluate, load_eval_questions

    if args.benchmark is not None:
        return _cmd_eval_benchmark(args)
    if args.annotations is not None or args.split is not None or args.parser is not None:
        raise ValueError("--annotations, --split and --parser need --benchmark")
    # The question file first: a bad record is reported before the (slow) model load.
    questions = load_eval_questions(args.data, args.image_folder, args.limit, args.subset_seed)
    model, tokenizer = load_checkpoint(args.checkpoint)
    processor = load_processor(args.checkpoint, tokenizer)
    out_dir = args.output or str(Path(args.checkpoint) / "eval")
    max_new_tokens = 16 if args.max_new_tokens is None else args.max_new_tokens
    report = evaluate(model, tokenizer, questions, out_dir=out_dir, batch_size=args.batch_size,
                      max_new_tokens=max_new_tokens, prompt_suffix=args.prompt_suffix, bf16=args.bf16,
                      processor=processor, routing=args.routing, routing_seed=args.routing_seed)
    report.pop("answers")
    print(json.dumps(report, indent=2))
    print(f"predictions: {Path(out_dir) / 'predictions.jsonl'}", file=sys.stderr)
    return 0


def _cmd_eval_benchmark(args: argparse.Namespace) -> int:
    from vlweave.builder import load_checkpoint, load_processor
    from vlweave.eval.benchmark_run import DEFAULT_MAX_NEW_TOKENS, run_benchmark
    from vlweave.eval.benchmarks.inputs import load_benchmark
    from vlweave.eval.benchmarks.registry import get_benchmark

    if args.prompt_suffix or args.subset_seed is not None:
        raise ValueError("--prompt-suffix and --subset-seed do not apply with --benchmark (the benchmark's own "
                         "prompt convention is used; --limit takes the first N questions)")
    get_benchmark(args.benchmark).describe(parser=args.parser)  # unknown benchmark / parser: fail before any work
    # The benchmark files first: a bad record is reported before the (slow) model load.
    inputs = load_benchmark(args.benchmark, args.data, image_folder=args.image_folder,
                            annotations=args.annotations, split=args.split, limit=args.limit)
    model, tokenizer = load_checkpoint(args.checkpoint)
    processor = load_processor(args.checkpoint, tokenizer)
    out_dir = Path(args.output or Path(args.checkpoint) / "eval" / args.benchmark)
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    report = run_benchmark(model, tokenizer, inputs, out_dir=out_dir, parser=args.parser,
                           checkpoint=str(args.checkpoint), batch_size=args.batch_size,
                           max_new_tokens=max_new_tokens, bf16=args.bf16, processor=processor,
                           routing=args.routing, routing_seed=args.routing_seed)
    print(json.dumps({k: v for k, v in report.items() if k != "model"}, indent=2, default=str))
    if not report["scored"]:
        print(f"not scored: {report['unscored_reason']}", file=sys.stderr)
    print(f"predictions: {out_dir / 'predictions.jsonl'}, metrics: {out_dir / 'metrics.json'}", file=sys.stderr)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from vlweave.serve.chat import ChatSession
    from vlweave.builder import load_checkpoint, load_processor

    model, tokenizer = load_checkpoint(args.checkpoint)
    session = ChatSession(model, tokenizer, image=args.image, max_new_tokens=args.max_new_tokens,
                          video=args.video, num_frames=args.frames,
                          processor=load_processor(args.checkpoint, tokenizer), routing=args.routing,
                          routing_seed=args.routing_seed)
    if args.prompt is not None:
        print(session.ask(args.prompt))
        if session.last_routing is not None:
            print(f"routing: {json.dumps(session.last_routing.to_json())}", file=sys.stderr)
        return 0
    print("vlweave chat — empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        print("assistant>", session.ask(text))
        if session.last_routing is not None:
            print(f"(routing: {session.last_routing.to_json()})", file=sys.stderr)
    return 0


def _cmd_mova_routing_data(args: argparse.Namespace) -> int:
    from vlweave.train.routing_data import routing_data_from_checkpoint

    summary = routing_data_from_checkpoint(args.checkpoint, args.data, args.output, image_folder=args.image_folder,
                                           expert_checkpoints=args.expert_checkpoint, batch_size=args.batch_size,
                                           limit=args.limit, max_experts=args.max_experts)
    print(json.dumps({k: v for k, v in summary.items() if k != "table"}, indent=2))
    return 0


def _routing_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--routing", metavar="MODE",
                   help="routed (MoVA) checkpoints: 'model' (the LM routes each question: the coarse stage), or "
                        "fixed for ablations: 'all', 'none', 'random' (seeded) or letters/experts like 'A,C'")
    p.add_argument("--routing-seed", type=int, default=0, help="seed of --routing random")


def _benchmark_names() -> list[str]:
    from vlweave.eval.benchmarks.registry import SCORERS

    return list(SCORERS)


def _benchmark_parsers() -> str:
    from vlweave.eval.benchmarks.registry import SCORERS

    return "; ".join(f"{name}: {'|'.join(spec.parsers)}" for name, spec in SCORERS.items())


def _benchmark_epilog() -> str:
    import textwrap

    from vlweave.eval.benchmarks.inputs import DATA_LAYOUTS

    lines = ["--data layout per --benchmark:"]
    for name, layout in DATA_LAYOUTS.items():
        lines.append(textwrap.fill(layout, width=100, initial_indent=f"  {name}: ", subsequent_indent="      "))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlweave", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"vlweave {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("assets", help="list or prepare the offline assets")
    a.add_argument("action", choices=["list", "pull"])
    a.add_argument("names", nargs="*")
    a.add_argument("--force", action="store_true", help="rebuild even if cached")
    a.set_defaults(func=_cmd_assets)

    d = sub.add_parser("demo", help="train + evaluate the embedded default (DINOv2-S + SmolLM2) on easy-vqa")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    d.add_argument("--output", help="run folder (default: train.output_dir of the demo preset)")
    d.add_argument("--config", default="demo", help="the demo preset or a variant (e.g. demo-dense-dci)")
    d.set_defaults(func=_cmd_demo)

    m = sub.add_parser("compare", help="train + evaluate several configs on the same data, steps and seeds")
    m.add_argument("configs", nargs="+", help="preset names or YAML files")
    m.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    m.add_argument("--seed-list", type=int, nargs="+", help="explicit seeds instead of --seeds")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key in every config")
    m.add_argument("--output", default="runs/compare", help="folder for runs, compare.json and compare.png")
    m.set_defaults(func=_cmd_compare)

    t = sub.add_parser("train", help="train from a YAML config or preset name")
    t.add_argument("config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--output", help="run folder (overrides train.output_dir)")
    t.add_argument("--resume", help="run folder or checkpoint to continue exactly")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="greedy evaluation of a checkpoint on a question file or a released benchmark",
                       description="Greedy evaluation of a checkpoint. Without --benchmark: a question JSONL scored by "
                                   "normalised exact match. With --benchmark: a released benchmark's files, LLaVA-1.5 "
                                   "prompts (methods.md 0.8) and the benchmark's exact scorer.",
                       epilog=_benchmark_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("checkpoint")
    e.add_argument("--data", required=True,
                   help="question JSONL ({question_id, image, text, answer}) or asset:file; with --benchmark: the "
                        "benchmark's file or folder (layouts below)")
    e.add_argument("--benchmark", metavar="NAME", help="score a released benchmark: " + ", ".join(_benchmark_names()))
    e.add_argument("--image-folder", help="folder the records' image paths are relative to")
    e.add_argument("--annotations", help="ground truth for --benchmark (POPE: folder of coco_pope_<split>.json; "
                                         "ScienceQA: problems.json; VQAv2/TextVQA/GQA: annotation JSON)")
    e.add_argument("--split", help="--benchmark split (recorded; POPE: keep one of adversarial/popular/random; "
                                   "ScienceQA: the problems.json split, default test)")
    e.add_argument("--parser", help="--benchmark answer parser; default: the first listed, the rule the "
                                    "benchmark's headline numbers were computed with (" + _benchmark_parsers() + ")")
    e.add_argument("--limit", type=int, help="first N questions (with --benchmark: MMBench questions with all "
                                             "their circular copies, MME images with both questions)")
    e.add_argument("--subset-seed", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-new-tokens", type=int, default=None, help="default 16; with --benchmark 128 (LLaVA's)")
    e.add_argument("--prompt-suffix", default="")
    e.add_argument("--bf16", action="store_true")
    e.add_argument("--output", help="folder for predictions.jsonl and eval_metrics.json (with --benchmark: "
                                    "metrics.json; default CHECKPOINT/eval/NAME)")
    _routing_arguments(e)
    e.set_defaults(func=_cmd_eval)

    c = sub.add_parser("chat", help="chat about an image or a video (interactive without --prompt)")
    c.add_argument("checkpoint")
    c.add_argument("--image")
    c.add_argument("--video", help="a video file: answered training-free from --frames sampled frames")
    c.add_argument("--frames", type=int, default=8, help="frames sampled from --video (default 8)")
    c.add_argument("--prompt")
    c.add_argument("--max-new-tokens", type=int, default=128)
    _routing_arguments(c)
    c.set_defaults(func=_cmd_chat)

    r = sub.add_parser("mova", help="MoVA tools: routing-data (routing bits + routing instructions from LM losses)")
    r_sub = r.add_subparsers(dest="mova_command", required=True)
    rd = r_sub.add_parser("routing-data", help="mark each expert useful per training sample (its LM loss below the "
                                               "base-only loss; at most 3) and write routing bits + instructions")
    rd.add_argument("checkpoint", help="a trained routed (MoVA) checkpoint; base-only = every routing bit 0")
    rd.add_argument("--data", required=True, help="LLaVA JSON/JSONL training records (or asset:file)")
    rd.add_argument("--image-folder", help="folder the records' image paths are relative to")
    rd.add_argument("--output", required=True, help="folder for routed.json, routing_instructions.json, "
                                                    "summary.json (and the resumable losses.partial.jsonl)")
    rd.add_argument("--expert-checkpoint", action="append", default=[], metavar="EXPERT=FOLDER",
                    help="score expert EXPERT with a separate checkpoint (base + that expert) instead; the main "
                         "checkpoint then gives the base-only loss")
    rd.add_argument("--batch-size", type=int, default=8)
    rd.add_argument("--limit", type=int, help="first N records only")
    rd.add_argument("--max-experts", type=int, default=3)
    rd.set_defaults(func=_cmd_mova_routing_data)
    return p


USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, KeyError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:  # config/data/user mistakes: one clear line (set VLWEAVE_DEBUG=1 for the traceback)
        import os

        if os.environ.get("VLWEAVE_DEBUG"):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"vlweave {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
