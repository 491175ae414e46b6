"""``vlweave demo | train | eval | chat | serve | export | assets | cache | compare | convert`` — the command line.

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


def _cmd_cache(args: argparse.Namespace) -> int:
    from vlweave import assets
    from vlweave.vision.cache import prune_cache

    files, total = prune_cache(dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path, reason in files:
        print(f"{verb} {path}: {reason}")
    print(f"{verb} {len(files)} file(s), {total / 2**20:.1f} MiB, from {assets.cache_dir() / 'features'}",
          file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vlweave.demo import run_demo

    run_demo(args.set, output_dir=args.output, config=args.config)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from vlweave.compare import compare

    seeds = list(range(args.seeds)) if args.seed_list is None else args.seed_list
    compare(args.configs, seeds, args.output, overrides=args.set)
    out = Path(args.output)
    print(f"results: {out / 'compare.json'}, table: {out / 'compare.md'}, chart: {out / 'compare.png'}", file=sys.stderr)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from vlweave.config import RunConfig
    from vlweave.presets import preset_path
    from vlweave.train.trainer import Trainer

    overrides = list(args.set)
    if args.output:
        overrides.append(f"train.output_dir={args.output}")
    if args.resume:
        cfg = _resume_config(args, preset_path)
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
    if trainer.is_main:  # under `accelerate launch`, one summary (rank 0's) and one evaluation
        out = {"run_dir": str(trainer.run_dir), "final": str(trainer.run_dir / "final"), **summary}
        if evaluate_after:
            out["eval"] = _evaluate_run(trainer, cfg, questions, args.group_by)
        print(json.dumps(out, indent=2))
    return 0


def _resume_config(args: argparse.Namespace, preset_path):
    """A resumed run continues with the config it was started with (``<run>/config.yaml``) and writes into the
    run folder given -- the one ``--resume`` names, or the one holding the named checkpoint -- whatever
    ``train.output_dir`` the saved config says (a copied or moved run folder stays independent of its original).
    ``--set`` and ``--output`` are refused: a resume that trained with other settings than the saved config claims
    would not be the run it continues."""
    from vlweave.config import RunConfig
    from vlweave.train.checkpoints import CKPT_NAME, recover_interrupted_writes

    if args.set or args.output:
        raise ValueError("--set and --output do not apply with --resume: a resumed run continues with the config it "
                         "was started with (RUN/config.yaml) in the folder given; start a new run to change settings")
    resume = Path(args.resume).expanduser()
    is_ckpt = (resume / "progress.json").exists() or bool(CKPT_NAME.fullmatch(resume.name))
    run_dir = resume.parent.parent if is_ckpt and resume.parent.name == "checkpoints" else resume
    recover_interrupted_writes(run_dir)  # a crash mid-swap leaves <ckpt>.old: put it back (and say so) first
    if not resume.exists():
        raise FileNotFoundError(f"{resume}: no such run folder or checkpoint")
    saved = run_dir / "config.yaml"
    source = saved if saved.exists() else preset_path(args.config)
    return RunConfig.load(source, [f"train.output_dir={run_dir}"])


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

    if args.batch_size is not None and args.batch_size < 1:  # None: the checkpoint's eval.batch_size
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
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
                      processor=processor, template=args.template, train=train, group_by=args.group_by,
                      routing=args.routing, routing_seed=args.routing_seed)
    report.pop("answers")
    from vlweave.hardware import bf16_available

    report["settings"] = {"bf16": bool(bf16 and bf16_available()), "data": data, "image_folder": image_folder,
                          "limit": limit, "subset_seed": subset_seed,
                          "template": args.template or processor.chat_template_name,
                          "run_config": str(cfg_path) if cfg_path else None,
                          "train_data": args.train_data or (None if run_cfg is None else "run config")}
    from vlweave.safe_io import atomic_write_text

    atomic_write_text(Path(out_dir) / "eval_metrics.json", json.dumps(report, indent=2, default=str), "eval metrics")
    _refresh_card(args.checkpoint, out_dir)
    print(json.dumps(report, indent=2, default=str))
    print_report(report, f"{data}: {report['n']} questions, greedy, normalised exact match", Console(stderr=True))
    print(f"predictions: {Path(out_dir) / 'predictions.jsonl'}", file=sys.stderr)
    return 0


def _refresh_card(checkpoint: str, out_dir: str | Path) -> None:
    """Results written inside the checkpoint folder go into its model card."""
    from vlweave.export.card import refresh_model_card

    if Path(out_dir).resolve().is_relative_to(Path(checkpoint).resolve()):
        refresh_model_card(checkpoint)


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
                           max_new_tokens=max_new_tokens, bf16=bool(args.bf16), processor=processor,
                           routing=args.routing, routing_seed=args.routing_seed)
    _refresh_card(args.checkpoint, out_dir)
    print(json.dumps({k: v for k, v in report.items() if k != "model"}, indent=2, default=str))
    if not report["scored"]:
        print(f"not scored: {report['unscored_reason']}", file=sys.stderr)
    print(f"predictions: {out_dir / 'predictions.jsonl'}, metrics: {out_dir / 'metrics.json'}", file=sys.stderr)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from vlweave.serve.chat import ChatSession
    from vlweave.builder import load_checkpoint, load_processor

    if args.max_new_tokens < 1 or args.frames < 1:
        raise ValueError(f"--max-new-tokens and --frames must be at least 1, got {args.max_new_tokens} and "
                         f"{args.frames}")
    if args.image is not None and not Path(args.image).is_file():  # before the model load (a video: data/video.py)
        raise FileNotFoundError(f"{args.image}: no such image file")
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


def _cmd_convert(args: argparse.Namespace) -> int:
    from vlweave.mova_convert import convert

    conv = convert(args.source, args.out, check=args.check)
    print(conv.report())
    print(f"wrote {args.out} ({len(conv.tensors)} tensors as connector.*); skipped list: "
          f"{Path(args.out).with_suffix('.skipped.json')}", file=sys.stderr)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from vlweave.builder import load_checkpoint, load_processor
    from vlweave.serve.protocol import ServeLimits
    from vlweave.serve.server import Engine, run_server

    limits = ServeLimits(max_body_bytes=args.max_body_bytes, max_image_bytes=args.max_image_bytes,
                         max_image_pixels=args.max_image_pixels, max_images=args.max_images,
                         max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                         default_max_tokens=min(args.default_max_tokens, args.max_tokens),
                         allowed_image_dirs=list(args.allow_image_dir), allow_remote_images=args.allow_remote_images)
    for folder in limits.allowed_image_dirs:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--allow-image-dir {folder}: not a folder")
    model, tokenizer = load_checkpoint(args.checkpoint)
    engine = Engine(model, load_processor(args.checkpoint, tokenizer),
                    model_name=args.model_name or Path(args.checkpoint).resolve().name, limits=limits,
                    max_batch=args.max_batch, window_s=args.batch_window_ms / 1000.0,
                    feature_cache_images=args.feature_cache_images, default_temperature=args.default_temperature,
                    routing=args.routing, routing_seed=args.routing_seed)
    api_key = args.api_key or os.environ.get("VLWEAVE_API_KEY") or None
    print(f"serving {engine.model_name!r} on http://{args.host}:{args.port}/v1 "
          f"({'API key required' if api_key else 'no API key'})", file=sys.stderr)
    run_server(engine, host=args.host, port=args.port, api_key=api_key)
    return 0


def _checkpoint_folder(path: str) -> Path:
    """A checkpoint folder as given, or a run folder's ``final/``."""
    p = Path(path)
    if not (p / "config.json").exists() and (p / "final" / "config.json").exists():
        return p / "final"
    return p


def _cmd_export(args: argparse.Namespace) -> int:
    from vlweave.export.card import write_model_card

    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"{out}: exists and is not empty (pass --overwrite to write into it)")
    if args.merge:
        if args.format not in (None, "native"):
            raise ValueError("--merge writes a native checkpoint; drop --format")
        from vlweave.export.adapter import merge_adapter

        folder = merge_adapter(args.checkpoint, out, base=args.base)
        print(json.dumps({"merged": str(folder)}, indent=2))
        return 0
    if args.base:
        raise ValueError("--base goes with --merge")
    fmt = args.format or "native"
    if fmt == "adapter":
        from vlweave.export.adapter import export_adapter

        meta = export_adapter(args.checkpoint, out)
        print(json.dumps({"adapter": str(out), **{k: meta[k] for k in ("checkpoint", "step", "lora_targets",
                                                                      "modules_to_save")}}, indent=2))
        return 0
    from vlweave.builder import load_checkpoint, load_processor, save_checkpoint

    folder = _checkpoint_folder(args.checkpoint)
    model, tokenizer = load_checkpoint(folder)
    processor = load_processor(folder, tokenizer)
    if fmt == "native":
        save_checkpoint(model, tokenizer, out, processor=processor)
        write_model_card(model.config, out, title=folder.name)
        print(json.dumps({"native": str(out)}, indent=2))
        return 0
    from vlweave.export.llava import LLAVA_USAGE, example_prompt, export_llava

    diffs = export_llava(model, processor, out)
    prompt = example_prompt(processor)
    usage = LLAVA_USAGE + f"\n\nPROMPT, in this model's chat template:\n\n```\n{prompt}\n```"
    write_model_card(model.config, out, title=f"{folder.name} (HF llava)", extra=usage, source=folder)
    print(json.dumps({"llava": str(out), "max_abs_diff": diffs}, indent=2))
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

    k = sub.add_parser("cache", help="maintain the frozen-feature cache")
    k.add_argument("action", choices=["prune"], help="prune: delete files no current run reads (stores of the "
                   "earlier path-keyed format, damaged stores, temp files of interrupted writes)")
    k.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    k.set_defaults(func=_cmd_cache)
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
    _routing_arguments(e)
    e.set_defaults(func=_cmd_eval)

    v = sub.add_parser("convert", help="convert released weights to vlweave names")
    v.add_argument("family", choices=["mova"], help="mova: a released MoVA checkpoint's projector (MoV-Adapter)")
    v.add_argument("source", help="the released checkpoint folder or a state dict file (.safetensors/.bin/.pt)")
    v.add_argument("out", help="output .safetensors of connector.* tensors")
    v.add_argument("--check", help="a vlweave checkpoint folder (connector: mova, preset: reference) whose "
                                   "connector the converted tensors must fit, names and shapes")
    v.set_defaults(func=_cmd_convert)

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
    _routing_arguments(c)
    c.set_defaults(func=_cmd_chat)

    from vlweave.serve.protocol import ServeLimits  # the flags' defaults are the library's

    limits = ServeLimits()
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models, /health)")
    s.add_argument("checkpoint")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require Authorization: Bearer KEY (default: $VLWEAVE_API_KEY; none if unset)")
    s.add_argument("--model-name", help="the model id clients send (default: the checkpoint folder's name)")
    s.add_argument("--max-batch", type=int, default=8, help="most requests in one generate call (default 8)")
    s.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for others (default 10)")
    s.add_argument("--feature-cache-images", type=int, default=256,
                   help="images whose tower features are kept for reuse (0: off; default 256)")
    s.add_argument("--default-temperature", type=float, default=0.0,
                   help="temperature of requests that give none (default 0 = greedy, as vlweave chat)")
    s.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes)
    s.add_argument("--max-image-bytes", type=int, default=limits.max_image_bytes)
    s.add_argument("--max-image-pixels", type=int, default=limits.max_image_pixels)
    s.add_argument("--max-images", type=int, default=limits.max_images, choices=(0, 1),
                   help="images per request (vlweave models read one per conversation; 0: text only)")
    s.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="default: the LM's context minus the request's max_tokens")
    s.add_argument("--max-tokens", type=int, default=limits.max_tokens, help="largest max_tokens a request may ask")
    s.add_argument("--default-max-tokens", type=int, default=limits.default_max_tokens)
    s.add_argument("--allow-image-dir", action="append", default=[], metavar="FOLDER",
                   help="allow image_url parts naming local files under FOLDER (repeatable; default: none)")
    s.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (default: refused)")
    _routing_arguments(s)
    s.set_defaults(func=_cmd_serve)

    x = sub.add_parser("export", help="write a checkpoint as HF llava, a LoRA adapter (peft), or merge an adapter",
                       description="vlweave export CHECKPOINT --format llava OUT: an HF LlavaForConditionalGeneration "
                                   "checkpoint + processor (projector connectors on one tower only; others are "
                                   "refused with the reason). --format adapter: a LoRA run's adapter-only folder "
                                   "(peft). --merge: fold an adapter folder into its base. --format native (default): "
                                   "re-save with a refreshed model card.")
    x.add_argument("checkpoint", help="a checkpoint or run folder (an adapter folder with --merge)")
    x.add_argument("output", help="the folder to write")
    x.add_argument("--format", choices=("native", "llava", "adapter"))
    x.add_argument("--merge", action="store_true", help="CHECKPOINT is an adapter folder: merge it into its base")
    x.add_argument("--base", help="with --merge: the base checkpoint (default: rebuilt from the adapter's run config)")
    x.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    x.set_defaults(func=_cmd_export)

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
EXIT_USER_ERROR = 2  # bad config, data, checkpoint or file; disk full
EXIT_NONFINITE = 3  # training stopped on a NaN/inf loss or gradient
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


def _os_message(exc: OSError) -> str:
    """An OS error as one line that names its file (``DiskFullError`` already does)."""
    text = exc.strerror or str(exc)
    if exc.filename and str(exc.filename) not in text:
        return f"{exc.filename}: {text}"
    return text


def main(argv: list[str] | None = None) -> int:
    import os

    from vlweave.train.guards import NonFiniteLossError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NonFiniteLossError as exc:
        if os.environ.get("VLWEAVE_DEBUG"):
            raise
        print(f"vlweave {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    except USER_ERRORS as exc:  # config/data/user mistakes: one clear line (set VLWEAVE_DEBUG=1 for the traceback)
        if os.environ.get("VLWEAVE_DEBUG"):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        if isinstance(exc, OSError) and exc.filename:
            msg = _os_message(exc)
        print(f"vlweave {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # disk full, permissions, I/O errors: the file and the reason, not a traceback
        if os.environ.get("VLWEAVE_DEBUG"):
            raise
        print(f"vlweave {args.command}: error: {_os_message(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # checkpoints and partial predictions written so far are complete files
        print(f"vlweave {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
