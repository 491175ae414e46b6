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
    questions = None
    evaluate_after = bool(cfg.eval.data) and not args.no_eval
    if evaluate_after and cfg.eval.data != "synthetic":
        from vlweave.eval.runner import load_eval_questions

        # The question file first: a bad record is reported before any training.
        try:
            questions = load_eval_questions(cfg.eval.data, cfg.eval.image_folder, cfg.eval.limit,
                                            cfg.eval.subset_seed)
        except (FileNotFoundError, ValueError) as exc:
            raise type(exc)(f"{exc} (eval.data of the config: `vlweave train` evaluates at the end; fix the "
                            f"path or pass --no-eval)") from None
    trainer = Trainer(cfg)
    summary = trainer.train(resume=args.resume)
    out = {"run_dir": str(trainer.run_dir), "final": str(trainer.run_dir / "final"), **summary}
    if evaluate_after:
        out["eval"] = _evaluate_run(trainer, cfg, questions, args.group_by)
    print(json.dumps(out, indent=2))
    return 0


def _evaluate_run(trainer, cfg, questions, group_by: str | None) -> dict:
    """`vlweave train`'s evaluation at the end (the config's eval block): predictions.jsonl, eval_metrics.json and
    metrics.json in the run folder, the table on stderr; returns the headline numbers."""
    from rich.console import Console

    from vlweave.eval.analysis import print_report
    from vlweave.runs import evaluate_trained

    accuracy, groups, report, _ = evaluate_trained(trainer, cfg, questions, trainer.run_dir, trainer.progress,
                                                   group_by)
    (trainer.run_dir / "metrics.json").write_text(json.dumps(report, indent=2, default=str))
    if questions is not None:
        print_report(report, f"{cfg.eval.data}: {report['n']} questions, greedy, normalised exact match",
                     Console(stderr=True))
    return {"accuracy": accuracy, "groups": groups, "metrics": str(trainer.run_dir / "metrics.json")}


def _checkpoint_run_config(checkpoint: str | Path):
    """The run config a checkpoint was trained with: ``final/run_config.yaml``, else the run folder's
    ``config.yaml`` beside ``final/``; None for a checkpoint made elsewhere."""
    from vlweave.config import RunConfig
    from vlweave.train.trainer import RUN_CONFIG_NAME

    for path in (Path(checkpoint) / RUN_CONFIG_NAME, Path(checkpoint).parent / "config.yaml"):
        if path.is_file():
            return RunConfig.load(path), path
    return None, None


def _cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console

    from vlweave.builder import load_checkpoint, load_processor
    from vlweave.eval.analysis import print_report, train_questions
    from vlweave.eval.runner import evaluate, load_eval_questions
    from vlweave.runs import training_questions

    if args.benchmark is not None:
        return _cmd_eval_benchmark(args)
    if args.annotations is not None or args.split is not None or args.parser is not None:
        raise ValueError("--annotations, --split and --parser need --benchmark")
    # The checkpoint's own eval settings unless overridden on the command line.
    run_cfg, cfg_path = _checkpoint_run_config(args.checkpoint)
    ev = run_cfg.eval if run_cfg is not None else None
    data = args.data or (ev.data if ev is not None else "")
    if not data or data == "synthetic":
        raise ValueError(f"{args.checkpoint}: give --data (the checkpoint's run config "
                         f"{'has no eval.data' if ev is not None else 'was not found'})")
    own = ev is not None and data == ev.data  # the config's own question file: its image folder and subset too
    image_folder = args.image_folder or (ev.image_folder if own else None)
    limit = args.limit if args.limit is not None else (ev.limit if own else None)
    subset_seed = args.subset_seed if args.subset_seed is not None else (ev.subset_seed if own else None)
    # The question file first: a bad record is reported before the (slow) model load.
    questions = load_eval_questions(data, image_folder, limit, subset_seed)
    if args.train_data:
        from vlweave.assets import resolve_data_path

        train = train_questions(resolve_data_path(args.train_data)[0])
    else:
        train = training_questions(run_cfg) if run_cfg is not None else None
    from vlweave.eval.analysis import group_field

    group_field(questions, args.group_by)  # a --group-by the questions lack fails before the model load
    model, tokenizer = load_checkpoint(args.checkpoint)
    processor = load_processor(args.checkpoint, tokenizer)
    out_dir = args.output or str(Path(args.checkpoint) / "eval")
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else (ev.max_new_tokens if ev else 16)
    batch_size = args.batch_size if args.batch_size is not None else (ev.batch_size if ev else 32)
    suffix = args.prompt_suffix if args.prompt_suffix is not None else (ev.prompt_suffix if ev else "")
    # As the run evaluated at its end: bf16 autocast changes greedy answers where two tokens are close.
    bf16 = args.bf16 if args.bf16 is not None else (run_cfg.train.bf16 if run_cfg is not None else False)
    report = evaluate(model, tokenizer, questions, out_dir=out_dir, batch_size=batch_size,
                      max_new_tokens=max_new_tokens, prompt_suffix=suffix, bf16=bf16,
                      processor=processor, template=args.template, train=train, group_by=args.group_by)
    report.pop("answers")
    from vlweave.hardware import bf16_available

    report["settings"] = {"bf16": bool(bf16 and bf16_available()), "data": data, "image_folder": image_folder,
                          "limit": limit, "subset_seed": subset_seed,
                          "template": args.template or processor.chat_template_name,
                          "run_config": str(cfg_path) if cfg_path else None,
                          "train_data": args.train_data or (None if run_cfg is None else "run config")}
    (Path(out_dir) / "eval_metrics.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    print_report(report, f"{data}: {report['n']} questions, greedy, normalised exact match", Console(stderr=True))
    print(f"predictions: {Path(out_dir) / 'predictions.jsonl'}", file=sys.stderr)
    return 0


def _cmd_eval_benchmark(args: argparse.Namespace) -> int:
    from vlweave.builder import load_checkpoint, load_processor
    from vlweave.eval.benchmark_run import DEFAULT_MAX_NEW_TOKENS, run_benchmark
    from vlweave.eval.benchmarks.inputs import load_benchmark
    from vlweave.eval.benchmarks.registry import get_benchmark

    if not args.data:
        raise ValueError("--benchmark needs --data (the benchmark's file or folder)")
    if args.group_by or args.train_data or args.template:
        raise ValueError("--group-by, --train-data and --template do not apply with --benchmark")
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
                           checkpoint=str(args.checkpoint), batch_size=args.batch_size or 32,
                           max_new_tokens=max_new_tokens, bf16=bool(args.bf16), processor=processor)
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
                          processor=load_processor(args.checkpoint, tokenizer))
    if args.prompt is not None:
        print(session.ask(args.prompt))
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
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from vlweave import config_docs

    if args.action == "docs":
        if args.check:
            problems = config_docs.check(args.output)
            for p in problems:
                print(f"vlweave config docs: {p}", file=sys.stderr)
            return 1 if problems else 0
        print(f"wrote {config_docs.write(args.output)}", file=sys.stderr)
        return 0
    import yaml

    from vlweave.config import RunConfig
    from vlweave.presets import preset_path

    if not args.config:
        raise ValueError("config show needs a CONFIG (a YAML file or preset name)")
    # the resolved config (base chain and --set applied), as a run saves it in config.yaml
    print(yaml.safe_dump(RunConfig.load(preset_path(args.config), args.set).to_dict(), sort_keys=False), end="")
    return 0


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
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end (the config's eval block)")
    t.add_argument("--group-by", metavar="FIELD", help="group the final evaluation by this question field "
                                                       "(default: category/type/domain when present, else template)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="greedy evaluation of a checkpoint on a question file or a released benchmark",
                       description="Greedy evaluation of a checkpoint. Without --benchmark: a question JSONL scored by "
                                   "normalised exact match. With --benchmark: a released benchmark's files, LLaVA-1.5 "
                                   "prompts (methods.md 0.8) and the benchmark's exact scorer.",
                       epilog=_benchmark_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("checkpoint")
    e.add_argument("--data",
                   help="question JSONL ({question_id, image, text, answer}) or asset:file (default: the "
                        "checkpoint's own eval.data); with --benchmark: the benchmark's file or folder (layouts below)")
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
    e.add_argument("--batch-size", type=int, default=None, help="default: the checkpoint's eval.batch_size, else 32")
    e.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the checkpoint's eval.max_new_tokens, else 16; with --benchmark 128 (LLaVA's)")
    e.add_argument("--prompt-suffix", default=None, help="default: the checkpoint's eval.prompt_suffix")
    e.add_argument("--template", help="chat template instead of the checkpoint's own (plain | vicuna_v1 | tokenizer)")
    e.add_argument("--group-by", metavar="FIELD", help="report accuracy per value of this question field (default: "
                                                       "category/type/domain when present, else the question template)")
    e.add_argument("--train-data", metavar="FILE", help="training data the blind baselines learn from (default: "
                                                        "the checkpoint's run config's training data)")
    e.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast where native (default: the checkpoint's train.bf16, as its run evaluated; "
                        "else off)")
    e.add_argument("--output", help="folder for predictions.jsonl and eval_metrics.json (with --benchmark: "
                                    "metrics.json; default CHECKPOINT/eval/NAME)")
    e.set_defaults(func=_cmd_eval)

    g = sub.add_parser("config", help="the run-config reference (docs/config.md) or a resolved config")
    g.add_argument("action", choices=["docs", "show"], help="docs: write docs/config.md from the config dataclasses "
                                                            "and their comments; show: print CONFIG resolved")
    g.add_argument("config", nargs="?", help="show: a YAML file or preset name")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--output", default="docs/config.md", help="docs: the file to write (default docs/config.md)")
    g.add_argument("--check", action="store_true", help="docs: exit 1 when the file is stale or a field lacks a "
                                                        "comment, write nothing")
    g.set_defaults(func=_cmd_config)

    c = sub.add_parser("chat", help="chat about an image or a video (interactive without --prompt)")
    c.add_argument("checkpoint")
    c.add_argument("--image")
    c.add_argument("--video", help="a video file: answered training-free from --frames sampled frames")
    c.add_argument("--frames", type=int, default=8, help="frames sampled from --video (default 8)")
    c.add_argument("--prompt")
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.set_defaults(func=_cmd_chat)
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
