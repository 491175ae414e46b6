"""The trainer on 2 processes (accelerate's CPU launcher, gloo) equals 1 process with the same
global batch: same loss curve and final weights (<= 1e-5), the plan sharded by rank (every planned sample once),
the feature cache built by rank 0 only, only rank 0 writing, and a 2-process run killed with SIGKILL mid-stage then
resumed equal to the uninterrupted one.  Plus the single-process pieces: gradient checkpointing leaves loss and
gradients unchanged, the planned loader leaves the global RNG alone, mixed-precision choices, resume guards.

Two launches of 2 forked processes: one trains A (uninterrupted) and then B (killed), the other resumes B."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distributed_worker
from helpers import align_stage, finetune_stage, isolated_env, losses, make_batch, make_run
from vlweave.builder import build_model
from vlweave.train.distributed import enable_gradient_checkpointing, planned_loader, resolve_mixed_precision
from vlweave.train.trainer import Trainer, plan_batches

ROOT = Path(__file__).resolve().parents[1]
PER_DEVICE, ACCUM, WORLD = 2, 2, 2  # global batch 8


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


def run_cfg(tmp: Path, out: str, grad_accum: int):
    """align (connector) 4 steps, then finetune (connector + LoRA on the LM) 4 steps; checkpoint every 2 steps;
    frozen-feature cache on."""
    cfg = make_run(tmp, cache_features=True, out=out, stages=[
        align_stage(max_steps=4, epochs=10.0, batch_size=PER_DEVICE, grad_accum=grad_accum, warmup_ratio=0.25),
        finetune_stage("lora", max_steps=4, epochs=10.0, lr=2e-3, batch_size=PER_DEVICE, grad_accum=grad_accum,
                       warmup_ratio=0.25)])
    cfg.train.save_every = 2
    return cfg


def launch(configs: list[Path], report: Path, *, killed: bool = False) -> None:
    """2 processes of ``distributed_worker.run`` through accelerate's CPU launcher (``debug_launcher``: fork, gloo
    over a file rendezvous, so no port is shared with other test runs on the machine).  Forked children start
    with this process's imports, which keeps the test cheap; ``accelerate launch -m vlweave.cli train`` itself is
    the same trainer under torchrun's environment (docs/distributed.md)."""
    from accelerate import debug_launcher
    from torch.multiprocessing import ProcessExitedException

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLWEAVE_CACHE", str(report.parent / "launch-cache"))  # a cache the 1-process reference did not fill
        mp.setenv("OMP_NUM_THREADS", "1")  # else accelerate gives each CPU process cores / processes threads
        try:
            debug_launcher(distributed_worker.run, args=(str(report), *map(str, configs)), num_processes=WORLD)
        except ProcessExitedException as exc:
            if not killed or exc.signal_name != "SIGKILL":
                raise
        else:
            assert not killed, "run B should have been killed"


def reports(report: Path, name: str) -> list[dict]:
    return [json.loads((report / f"{name}.rank{r}.json").read_text()) for r in range(WORLD)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1-process reference (grad_accum 4) here; A (2 processes, uninterrupted) and B (2 processes, SIGKILLed
    after ckpt-s1-000002, then resumed) through accelerate's CPU launcher."""
    tmp = tmp_path_factory.mktemp("dist")
    report = tmp / "report"
    report.mkdir()
    ref = Trainer(run_cfg(tmp, "ref", ACCUM * WORLD), progress=False)
    ref.train()
    paths = {}
    for name, out in (("A", "A"), ("B", "B-kill"), ("B.resume", "B-kill")):
        paths[name] = tmp / f"{name}.yaml"
        run_cfg(tmp, out, ACCUM).save(paths[name])
    nan = make_run(tmp, out="C-nan", stages=[align_stage(max_steps=3, batch_size=PER_DEVICE, grad_accum=1)])
    nan.train.on_nonfinite = "skip"
    nan.save(paths.setdefault("C", tmp / "C.yaml"))
    launch([paths["A"], paths["C"], paths["B"]], report, killed=True)
    assert (report / "A.rank0.json").exists() and (report / "A.rank1.json").exists()
    ckpts = sorted(p.name for p in (tmp / "B-kill" / "checkpoints").iterdir())
    assert ckpts == ["ckpt-s0-000002", "ckpt-s0-000004", "ckpt-s1-000002"], ckpts  # nothing after the kill
    launch([paths["B.resume"]], report)
    return {"ref": ref, "tmp": tmp, "A": reports(report, "A"), "B": reports(report, "B.resume"),
            "C": reports(report, "C")}


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    ref, tmp, a = runs["ref"], runs["tmp"], runs["A"]
    assert [r["world"] for r in a] == [2, 2] and [r["is_main"] for r in a] == [True, False]
    assert [(m["stage_index"], m["step"]) for m in a[0]["metrics"]] == [(m["stage_index"], m["step"]) for m in ref.metrics]
    assert len(ref.metrics) == 8
    diff = max(abs(x - y) for x, y in zip(losses(a[0]["metrics"]), losses(ref.metrics)))
    assert diff <= 1e-5, f"loss curves differ by {diff:.2e}"
    assert [m["tokens"] for m in a[0]["metrics"]] == [m["tokens"] for m in ref.metrics]
    assert [m["lr"] for m in a[0]["metrics"]] == pytest.approx([m["lr"] for m in ref.metrics], abs=1e-12)
    wa, wr = final_weights(tmp / "A"), final_weights(ref.run_dir)
    assert set(wa) == set(wr)
    worst = max(float((wa[k] - wr[k]).abs().max()) for k in wr)
    assert worst <= 1e-5, f"final weights differ by {worst:.2e}"
    # ...and training moved them (the comparison is not between two copies of the initial weights).
    init, _ = build_model(run_cfg(tmp, "init", 1))
    moved = float((wr["connector.projector.0.weight"] - init.connector.projector[0].weight.detach()).abs().max())
    assert moved > 1e-3


def test_each_planned_sample_runs_once_on_one_rank(runs):
    ref, a = runs["ref"], runs["A"]
    ids = [s.id for s in ref.stage_samples(0, ref.cfg.train.stages[0])]
    for index, stage in enumerate(ref.cfg.train.stages):
        _, mbs = plan_batches(len(ids), stage, ref.cfg.train.seed, index)  # the 1-process plan, grad_accum 4
        planned = [[ids[i] for i in mb] for mb in mbs]
        per_rank = [r["seen"][index * 8 : (index + 1) * 8] for r in a]  # 4 steps x 2 micro-batches a rank
        assert [len(p) for p in per_rank] == [8, 8]
        # micro-batch j of the plan ran on rank j % 2, as its (j // 2)-th micro-batch
        assert [mb for pair in zip(*per_rank) for mb in pair] == planned


def test_rank0_builds_the_feature_cache_and_alone_writes(runs):
    main, other = runs["A"]
    assert main["tower_calls"] > 0 and other["tower_calls"] == 0  # rank 1 read the store rank 0 wrote
    assert main["files_written"] > 0 and other["files_written"] == 0
    assert (main["plots"], main["exports"]) == (1, 1) and (other["plots"], other["exports"]) == (0, 0)
    run = runs["tmp"] / "A"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "ckpt-s0-000002", "ckpt-s0-000004", "ckpt-s1-000002", "ckpt-s1-000004"]
    prog = json.loads((run / "checkpoints" / "ckpt-s1-000004" / "progress.json").read_text())
    assert (prog["world_size"], prog["batch_size"], prog["global_batch"]) == (2, PER_DEVICE, 8)
    assert len(torch.load(run / "checkpoints" / "ckpt-s1-000004" / "state.pt", weights_only=False)["ranks"]) == 2
    assert (run / "loss.png").exists() and (run / "train_metrics.json").exists()


def test_killed_two_process_run_resumes_to_the_uninterrupted_one(runs):
    a, b, tmp = runs["A"], runs["B"], runs["tmp"]
    assert [(m["stage_index"], m["step"]) for m in b[0]["metrics"]] == [(m["stage_index"], m["step"]) for m in a[0]["metrics"]]
    assert losses(b[0]["metrics"]) == pytest.approx(losses(a[0]["metrics"]), abs=1e-6)
    assert len(b[0]["seen"]) == 4  # the resumed launch ran only the 2 steps after the checkpoint (2 micro-batches each)
    wa, wb = final_weights(tmp / "A"), final_weights(tmp / "B-kill")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


def test_a_nan_on_one_rank_is_skipped_by_every_rank(runs):
    """on_nonfinite=skip with a NaN loss on rank 1 only: both ranks skip that step and stay identical."""
    main, other = runs["C"]
    assert [s["step"] for s in main["skipped"]] == [s["step"] for s in other["skipped"]] == [2]
    assert [m["loss"] is None for m in main["metrics"]] == [False, True, False]
    assert main["connector"] == other["connector"]  # the same weights on both ranks (none applied the NaN step)
    assert all(math.isfinite(x) for x in main["connector"])


def test_resume_refuses_another_global_batch(runs, tmp_path):
    cfg = run_cfg(runs["tmp"], "A", 1)  # 2 per device x 1 x 1 process = 2, the checkpoint's global batch is 8
    with pytest.raises(ValueError, match=r"global batch 8 .* = 2 would change the batch plan"):
        Trainer(cfg, progress=False).train(resume=runs["tmp"] / "A" / "checkpoints" / "ckpt-s0-000002")


# ---- single-process pieces ---------------------------------------------------------------------------------


def test_gradient_checkpointing_keeps_loss_and_gradients(tmp_path):
    cfg = make_run(tmp_path)

    def grads(components):
        torch.manual_seed(0)
        model, tok = build_model(cfg)
        model.requires_grad_(True)
        if components:
            assert enable_gradient_checkpointing(model, components) == ["language", "vision.base"]
        model.train()
        # calls of the first module inside one layer of each (HF checkpoints a layer's forward, not its hooks,
        # and the recompute stops early once it has what backward needs): 2 when backward recomputes the layer
        calls = {"language": 0, "vision": 0}
        model.language_model.get_decoder().layers[0].input_layernorm.register_forward_pre_hook(
            lambda *_: calls.__setitem__("language", calls["language"] + 1))
        model.vision_tower.encoder.layers[0].layer_norm1.register_forward_pre_hook(
            lambda *_: calls.__setitem__("vision", calls["vision"] + 1))
        batch = make_batch(model, tok, cfg, n=2)
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), calls, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    l0, c0, g0 = grads([])
    l1, c1, g1 = grads(["language", "vision"])
    assert c0 == {"language": 1, "vision": 1} and c1 == {"language": 2, "vision": 2}
    assert l1 == pytest.approx(l0, abs=1e-6)
    assert set(g1) == set(g0) and any(n.startswith("vision_towers.") for n in g0)
    assert max(float((g0[n] - g1[n]).abs().max()) for n in g0) <= 1e-6
    with pytest.raises(ValueError, match="'connector' is not one of"):
        enable_gradient_checkpointing(build_model(cfg)[0], ["connector"])


def test_planned_loader_yields_the_plan_and_leaves_the_global_rng(tmp_path):
    data = {i: {"id": i} for i in range(6)}
    plan = [[3, 1], [0, 5], [2, 4]]
    before = torch.get_rng_state()
    got = [b for b in planned_loader(data, plan, lambda ex: [e["id"] for e in ex])]
    assert got == plan
    assert torch.equal(torch.get_rng_state(), before)


def test_mixed_precision_choice():
    assert resolve_mixed_precision("no", True, cuda=True, launcher="bf16") == "no"  # the config wins
    assert resolve_mixed_precision("auto", False, cuda=False, launcher=None) == "no"
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        resolve_mixed_precision("fp16", False, cuda=False, launcher=None)
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        resolve_mixed_precision("auto", False, cuda=False, launcher="fp16")  # the launcher's fp16 on a CPU
    with pytest.raises(ValueError, match="not one of"):
        resolve_mixed_precision("fp8", False, cuda=True, launcher=None)


def test_export_from_a_checkpoint_equals_the_run_export(runs):
    """What a sharded engine's run exports (a fresh model + the last checkpoint's gathered tensors) is what the
    live model exports."""
    ref = runs["ref"]
    again = Trainer(run_cfg(runs["tmp"], "ref-again", ACCUM * WORLD), progress=False)
    out = again.export_from_checkpoint(ref.run_dir / "checkpoints" / "ckpt-s1-000004")
    wa, wb = final_weights(ref.run_dir), load_file(str(out / "model.safetensors"))
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("name, kind, extra", [
    ("ddp", "MULTI_GPU", {}), ("fsdp", "FSDP", {"fsdp_version": 2}),
    ("zero2", "DEEPSPEED", {"zero_stage": 2}), ("zero3", "DEEPSPEED", {"zero_stage": 3, "zero3_save_16bit_model": True}),
])
def test_accelerate_config_files_parse(name, kind, extra):
    """configs/accelerate/*.yaml are valid accelerate config files (accelerate's own loader; unknown keys fail)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert (cfg.distributed_type.name, cfg.num_processes, cfg.mixed_precision) == (kind, 8, "bf16")
    section = cfg.fsdp_config if kind == "FSDP" else cfg.deepspeed_config
    assert extra.items() <= section.items()


def test_llava15_on_8_gpus_keeps_the_released_global_batch():
    """docs/distributed.md: llava15 on 8 processes with grad_accum 1 = LLaVA-1.5's 256 (align) and 128 (finetune)."""
    from vlweave.config import RunConfig
    from vlweave.presets import preset_path

    cfg = RunConfig.load(preset_path("llava15"), ["train.stages.0.grad_accum=1", "train.stages.1.grad_accum=1"])
    assert [s.batch_size * s.grad_accum * 8 for s in cfg.train.stages] == [256, 128]
    one = RunConfig.load(preset_path("llava15"))  # the preset as written: one device, the same global batches
    assert [s.batch_size * s.grad_accum for s in one.train.stages] == [256, 128]


def test_deepspeed_inputs_follow_its_weight_dtype():
    """DeepSpeed has no autocast: under its bf16 the float inputs (nested cached features too) become bf16; ids,
    labels and the context stay; other engines get the very same batch."""
    from accelerate.utils import DistributedType

    from vlweave.context import VlweaveContext
    from vlweave.train.distributed import engine_inputs

    ctx = VlweaveContext.for_batch([True])
    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "vision_features": {"base": [torch.zeros(1, 4, 8)]},
             "pixel_values": torch.zeros(1, 3, 4, 4), "context": ctx}
    out = engine_inputs(batch, DistributedType.DEEPSPEED, "bf16")
    assert out["vision_features"]["base"][0].dtype == torch.bfloat16 and out["pixel_values"].dtype == torch.bfloat16
    assert out["input_ids"].dtype == torch.long and out["context"] is ctx
    assert engine_inputs(batch, DistributedType.MULTI_GPU, "bf16") is batch
    assert engine_inputs(batch, DistributedType.DEEPSPEED, "no") is batch
