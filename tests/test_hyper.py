"""HyperLLaVA (methods.md §3): the dynamic expert against a direct re-computation of Eqs. 2-5, the visual expert
(``hyper_<inner>``: EV1/EV2/both on plain and Dense Connector projectors), the language expert (``hyper_expert``:
parallel to the FFN of the configured blocks of Llama, Qwen2 and Gemma-3 LMs, guidance once per sequence from the
prompt), no-op at initialisation, generation (cached == uncached, batched left-padded == one by one), the two-stage
recipe (stage 1 leaves the LM alone), checkpoints (reload, export, exact resume, CLI eval/chat), the matched
baselines and bad input."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import align_stage, finetune_stage, isolated_env, losses, make_batch, make_run
from vlweave.builder import build_model, load_checkpoint
from vlweave.config import LMModuleConfig, RunConfig
from vlweave.connectors import build_connector
from vlweave.connectors.hyper import HyperVisualConnector, HyperVisualOptions
from vlweave.context import VlweaveContext
from vlweave.data.collate import pad_batch
from vlweave.eval.vqa import encode_question
from vlweave.hyper.expert import DynamicExpert, HyperExpertOptions
from vlweave.hyper.matching import lora_parameters_per_rank, matched_sizes
from vlweave.language.hyper_expert import LanguageExpert
from vlweave.modeling import VlweaveForConditionalGeneration
from vlweave.presets import preset_path
from vlweave.train.trainer import Trainer

SMALL = {"bottleneck": 4, "embed_dim": 8, "hyper_hidden": 8}
EXPERT = LMModuleConfig(type="hyper_expert", name="language_expert", options=dict(SMALL))
QUESTIONS = ["What color?", "What is the color of the thing in this image?", "Describe it.", "What is this?"]


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    with isolated_env(tmp_path_factory.mktemp("vlweave-cache")):
        yield


def hyper_run(tmp_path: Path, *, language: str = "llama", connector: str = "hyper_mlp2x_gelu",
              options: dict | None = None, modules: list | None = None, layers: int = 4, **kw) -> RunConfig:
    tokenizer = "qwen" if language == "qwen2" else "chatml"
    cfg = make_run(tmp_path, vision="clip", language=language, tokenizer=tokenizer, template="tokenizer",
                   connector=connector, options={**SMALL, **(options or {})} if connector.startswith("hyper_")
                   else dict(options or {}), **kw)
    cfg.language.config_overrides["num_hidden_layers"] = layers
    if language == "gemma3_text":
        cfg.language.config_overrides.update({"head_dim": 16, "sliding_window": 64})
    cfg.language.modules = [EXPERT] if modules is None else modules
    return cfg


def perturb(model, std: float = 0.2, seed: int = 1) -> None:
    """Random expert weights (a trained-like state: every expert changes the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".expert." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def static_twin(cfg: RunConfig, seed: int = 0):
    """The static model of a hyper config (the inner connector, no LM-side module), built with the same seed."""
    static = copy.deepcopy(cfg)
    static.connector.type = cfg.connector.type.removeprefix("hyper_")
    static.connector.options = {k: v for k, v in cfg.connector.options.items()
                                if k not in {f for f in HyperVisualOptions.__dataclass_fields__}}
    static.language.modules = []
    torch.manual_seed(seed)
    return build_model(static)


def load_static_weights(hyper, static) -> None:
    """Copy the static model's weights into the hyper model (connector.X -> connector.inner.X)."""
    inner = isinstance(hyper.connector, HyperVisualConnector)
    state = {(k.replace("connector.", "connector.inner.", 1) if inner and k.startswith("connector.") else k): v
             for k, v in static.state_dict().items()}
    missing, unexpected = hyper.load_state_dict(state, strict=False)
    assert not unexpected
    assert missing and all(".expert." in k for k in missing), missing


def prompts_for(model, tok, with_image):
    return [encode_question(model, tok, q, img) for q, img in zip(QUESTIONS, with_image)]


def pixels_for(model, n, seed=0):
    s = model.facts.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def generate(model, tok, prompts, pixels, context=None, **kw):
    batch = pad_batch([{"input_ids": p} for p in prompts], tok.pad_token_id, padding_side="left")
    extra = {"pixel_values": pixels} if pixels is not None and len(pixels) else {}
    return model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=5,
                          min_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id, context=context,
                          **extra, **kw)


# ---- the dynamic expert (§3a Eqs. 2-5) ---------------------------------------------------------------------------


@pytest.mark.parametrize("share,hyper_act,act", [(True, "none", "silu"), (False, "gelu", "relu")])
def test_expert_equals_a_direct_recomputation_of_the_equations(share, hyper_act, act):
    torch.manual_seed(0)
    opts = HyperExpertOptions(embed_dim=4, bottleneck=3, hyper_hidden=6, hyper_activation=hyper_act, activation=act,
                              share_hypernetwork=share, zero_init=False, scale=0.5)
    sites = {"a": (5, 7), "b": (5, 7)}
    expert = DynamicExpert(sites, guidance_dim=6, options=opts)
    with torch.no_grad():
        for p in expert.parameters():
            p.normal_(std=0.3)
    assert len(expert.hypernets) == (1 if share else 2)
    guidance, x = torch.randn(3, 6), torch.randn(3, 4, 5)
    acts = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu, "none": lambda t: t}
    for site in sites:
        enc = expert.encoders[site]
        hyper = expert.hypernets[site if not share else "shape_5x7"]
        out = expert(site, guidance, x)
        assert out.shape == (3, 4, 7)
        for b in range(3):  # one sample at a time, every matrix written out
            e = enc.weight @ guidance[b] + enc.bias  # E_n(g)
            w = hyper.fc2.weight @ acts[hyper_act](hyper.fc1.weight @ e + hyper.fc1.bias) + hyper.fc2.bias  # Eq. 4
            k = w + torch.cat([expert.static_down[site].flatten(), expert.static_up[site].flatten()])  # K = w + b
            w_down, w_up = k[: 3 * 5].view(3, 5), k[3 * 5:].view(7, 3)
            direct = 0.5 * (w_up @ acts[act](w_down @ x[b].T)).T  # Eq. 5, per token
            torch.testing.assert_close(out[b], direct, atol=1e-5, rtol=1e-5)
    assert expert.generated_numel() == 2 * 3 * (5 + 7)


def test_a_fresh_expert_is_a_no_op_that_still_learns():
    torch.manual_seed(0)
    expert = DynamicExpert({"s": (5, 7)}, guidance_dim=6, options=HyperExpertOptions(embed_dim=4, bottleneck=3))
    out = expert("s", torch.randn(2, 6), torch.randn(2, 3, 5))
    assert torch.equal(out, torch.zeros(2, 3, 7))
    (out * torch.randn_like(out)).sum().backward()
    moved = {n for n, p in expert.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved == {"static_up.s", "hypernets.shape_5x7.fc2.weight", "hypernets.shape_5x7.fc2.bias"}


# ---- at initialisation the model is the static model, exactly ----------------------------------------------------


@pytest.mark.parametrize("connector,placement,language", [
    ("hyper_mlp2x_gelu", "ev1", "llama"), ("hyper_mlp2x_gelu", "ev2", "qwen2"), ("hyper_dense_dci", "both", "llama"),
    ("hyper_mlp2x_gelu", "ev1", "gemma3_text"),
])
def test_at_init_logits_equal_the_static_model_exactly(tmp_path, connector, placement, language):
    cfg = hyper_run(tmp_path, language=language, connector=connector, options={"placement": placement})
    if connector == "hyper_dense_dci":
        cfg.vision.config_overrides["num_hidden_layers"] = 6
    static, tok = static_twin(cfg)
    torch.manual_seed(0)
    hyper, _ = build_model(cfg)
    load_static_weights(hyper, static)
    batch = make_batch(static, tok, cfg, 3)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    static.eval(), hyper.eval()
    with torch.no_grad():
        torch.testing.assert_close(hyper(**inputs).logits, static(**inputs).logits, atol=0, rtol=0)
        perturb(hyper)
        assert not torch.allclose(hyper(**inputs).logits, static(**inputs).logits, atol=1e-3)


# ---- where the experts act -------------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["ev1", "ev2", "both"])
def test_visual_expert_placement_on_the_projector(tmp_path, placement):
    cfg = hyper_run(tmp_path, options={"placement": placement, "standardize": True}, modules=[])
    model, _ = build_model(cfg)
    perturb(model)
    model.eval()
    conn = model.connector
    pixels = pixels_for(model, 3)
    with torch.no_grad():
        (prepared,) = model.tower_features(pixels)["base"]
        tokens = conn(model.tower_features(pixels)).tokens
        inner = conn.inner
        f = (prepared - inner.feature_mean) / inner.feature_std  # the head's standardisation: the first Linear's input
        g = f.mean(dim=1)  # guidance: mean over the image's tokens
        l1, act, l2 = inner.projector
        u = l1(f)
        if placement in ("ev1", "both"):
            u = u + conn.expert("ev1", g, f)
        v = l2(act(u))
        if placement in ("ev2", "both"):
            v = v + conn.expert("ev2", g, u)
        torch.testing.assert_close(tokens, v, atol=1e-5, rtol=1e-5)
        # Per image: an image's tokens do not depend on the other images of the batch.
        torch.testing.assert_close(conn(model.tower_features(pixels[1:2])).tokens, tokens[1:2], atol=1e-5, rtol=1e-5)
    assert conn.generated_numel_per_image() == sum(4 * (i + o) for i, o in conn.expert.sites.values())


@pytest.mark.parametrize("language,layers,guidance", [("llama", [2, 3], 1), ("qwen2", [3], 2),
                                                       ("gemma3_text", [2], 0), ("llama", [0, 1, 2, 3], 1),
                                                       ("qwen2", [1], 2)])
def test_language_expert_sits_in_exactly_the_configured_blocks(tmp_path, language, layers, guidance):
    options = {**SMALL, "layers": layers, "guidance_layer": guidance}
    cfg = hyper_run(tmp_path, language=language, connector="mlp2x_gelu",
                    modules=[LMModuleConfig(type="hyper_expert", name="language_expert", options=options)])
    static, tok = static_twin(cfg)
    torch.manual_seed(0)
    hyper, _ = build_model(cfg)
    load_static_weights(hyper, static)
    perturb(hyper)
    assert hyper.lm_modules["language_expert"].layer_indices == layers
    batch = make_batch(static, tok, cfg, 2)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    static.eval(), hyper.eval()
    with torch.no_grad():
        hs = hyper(**inputs, output_hidden_states=True).hidden_states
        ref = static(**inputs, output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is block i's output: equal before the first expert block, different from it on.
    differs = [not torch.allclose(h, r, atol=1e-6) for h, r in zip(hs[1:], ref[1:])]
    first = min(layers)
    assert differs == [i >= first for i in range(4)], differs
    expert = hyper.lm_modules["language_expert"]
    assert expert.separate_pass == (first <= guidance)  # blocks at/before the guidance block: a guidance pass first


@pytest.mark.parametrize("language,adapter_input", [("llama", "residual"), ("llama", "normed"),
                                                    ("gemma3_text", "residual")])
def test_language_expert_is_parallel_to_the_ffn(tmp_path, language, adapter_input):
    """Eq. 7 on a real block: output = x_L + FFN(norm(x_L)) + E(x_L) (``normed``: E reads norm(x_L))."""
    from vlweave.language.hyper_expert import ffn_sites
    from vlweave.language.modules import decoder_layers

    options = {**SMALL, "layers": [2], "guidance_layer": 1, "adapter_input": adapter_input}
    cfg = hyper_run(tmp_path, language=language, connector="mlp2x_gelu",
                    modules=[LMModuleConfig(type="hyper_expert", name="language_expert", options=options)])
    model, tok = build_model(cfg)
    perturb(model)
    model.eval()
    block = decoder_layers(model.language_model)[2]
    norm, ffn, add_to = ffn_sites(block, 2)
    seen = {}
    hooks = [norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("x_L", a[0])),
             ffn.register_forward_pre_hook(lambda m, a: seen.__setitem__("normed", a[0])),
             add_to.register_forward_hook(lambda m, a, o: seen.__setitem__("ffn", o), prepend=True),  # before ours
             block.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o))]
    batch = make_batch(model, tok, cfg, 2)
    context = VlweaveContext.for_batch([True, True])
    try:
        with torch.no_grad():
            model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}, context=context)
    finally:
        for h in hooks:
            h.remove()
    expert = model.lm_modules["language_expert"].expert
    vector = context.guidance["language_expert"].vector
    x = seen["x_L"] if adapter_input == "residual" else seen["normed"]
    with torch.no_grad():
        expected = seen["x_L"] + seen["ffn"] + expert("2", vector, x)
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)


# ---- guidance: once per sequence, from the prompt, never from padding ------------------------------------------


@pytest.fixture(scope="module", params=["llama", "qwen2", "llama-all-blocks"])
def perturbed(request, tmp_path_factory):
    language = request.param.removesuffix("-all-blocks")
    modules = None
    if request.param.endswith("-all-blocks"):  # experts in every block: the guidance comes from a separate pass
        modules = [LMModuleConfig(type="hyper_expert", name="language_expert",
                                  options={**SMALL, "layers": [0, 1, 2, 3], "guidance_layer": 1})]
    cfg = hyper_run(tmp_path_factory.mktemp(f"gen-{request.param}"), language=language, modules=modules)
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    perturb(model, std=0.3)
    return model.eval(), tok


def test_cached_generation_equals_uncached_and_guidance_is_computed_once(perturbed):
    model, tok = perturbed
    expert: LanguageExpert = model.lm_modules["language_expert"]
    prompts = prompts_for(model, tok, [True, True, True, False])
    pixels = pixels_for(model, 3)
    seen: list[int] = []
    pool = expert.pool
    expert.pool = lambda hidden, mask: (seen.append(hidden.shape[1]), pool(hidden, mask))[1]  # count the calls
    try:
        cached = generate(model, tok, prompts, pixels)
        assert len(seen) == 1  # one guidance computation for the whole generation, at prefill (5 new tokens)
        uncached = generate(model, tok, prompts, pixels, use_cache=False)
        assert len(seen) == 2  # uncached: every step is a full forward, yet the prompt's guidance is kept
    finally:
        del expert.pool
    longest = max(len(p) for p in prompts)
    assert seen == [longest, longest]  # pooled over the prompt only, never over generated tokens
    assert cached.shape == (4, 5) and cached.tolist() == uncached.tolist()


def test_batched_left_padded_equals_one_by_one(perturbed):
    model, tok = perturbed
    with_image = [True, False, True, True]
    prompts = prompts_for(model, tok, with_image)
    assert len({len(p) for p in prompts}) > 1  # really padded
    pixels = pixels_for(model, 3, seed=4)
    context = VlweaveContext.for_batch(with_image)
    batched = generate(model, tok, prompts, pixels, context=context)
    vectors = context.guidance["language_expert"].vector
    k = 0
    for r, (prompt, img) in enumerate(zip(prompts, with_image)):
        alone_ctx = VlweaveContext.for_batch([img])
        alone = generate(model, tok, [prompt], pixels[k:k + 1] if img else None, context=alone_ctx)
        k += int(img)
        assert alone.tolist()[0] == batched.tolist()[r], r
        # The guidance never sees the padding: the padded row's vector is the lone prompt's.
        torch.testing.assert_close(vectors[r], alone_ctx.guidance["language_expert"].vector[0], atol=1e-5, rtol=1e-4)


def test_training_guidance_pools_over_the_prompt_not_the_answer(tmp_path):
    cfg = hyper_run(tmp_path, modules=[LMModuleConfig(type="hyper_expert", name="language_expert",
                                                      options={**SMALL, "guidance_layer": 1, "layers": [2, 3]})])
    model, tok = build_model(cfg)
    perturb(model)
    batch = make_batch(model, tok, cfg, 2)
    context = VlweaveContext.for_batch([True, True])
    with torch.no_grad():
        model(**batch, context=context)
        trained = context.guidance["language_expert"]
        # The same sample's prompt alone, as generation sees it: the same guidance.
        first_answer = int((batch["labels"][0] != -100).nonzero()[0])
        ids = batch["input_ids"][:1, :first_answer]
        alone = VlweaveContext.for_batch([True])
        model(input_ids=ids, pixel_values=batch["pixel_values"][:1], context=alone)
    assert int(trained.mask[0].sum()) == first_answer
    torch.testing.assert_close(trained.vector[0], alone.guidance["language_expert"].vector[0], atol=1e-5, rtol=1e-4)


# ---- the two-stage recipe, checkpoints, resume, export, CLI -----------------------------------------------------


def recipe_cfg(tmp_path: Path, out: str) -> RunConfig:
    """Stage 1 (connector = projector + visual expert) 2 steps, stage 2 (+ language expert, LM LoRA) 2 steps."""
    stage2 = finetune_stage("lora", max_steps=2, epochs=10.0, lr=2e-3,
                            tune={"vision": "frozen", "connector": "full", "language": "lora",
                                  "language_expert": "full"}, component_lr={"language_expert": 2e-2})
    cfg = hyper_run(tmp_path, cache_features=True, out=out, stages=[align_stage(max_steps=2, epochs=10.0), stage2])
    cfg.train.save_every = 1
    return cfg


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipe")
    trainer = Trainer(recipe_cfg(tmp, "A"), progress=False)
    m = trainer.model
    seen = {"init": {k: v.detach().clone() for k, v in m.state_dict().items()}}
    export = trainer.export

    def capture_then_export():
        batch = make_batch(m, trainer.tokenizer, trainer.cfg, 3)
        seen["inputs"] = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        m.eval()
        with torch.no_grad():
            seen["logits"] = m(**seen["inputs"]).logits
        seen["trained"] = {k: v.detach().clone() for k, v in m.state_dict().items()}
        return export()

    trainer.export = capture_then_export
    trainer.train()
    return trainer, seen


def test_stage_one_changes_no_lm_parameter(tmp_path):
    cfg = hyper_run(tmp_path, stages=[align_stage(max_steps=1)])
    trainer = Trainer(cfg, progress=False)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed and all(k.startswith("connector.") for k in changed), sorted(changed)
    assert {k for k in changed if k.startswith("connector.expert.")}  # the visual expert trained in stage 1
    assert {k for k in changed if k.startswith("connector.inner.projector.")}
    assert trainer.trained == {"connector": {"full", "buffers"}}


def test_recipe_checkpoints_keep_the_experts_and_stage_two_trains_them(recipe):
    trainer, seen = recipe
    ck = trainer.run_dir / "checkpoints"
    first = json.loads((ck / "ckpt-s0-000002" / "progress.json").read_text())
    assert first["components"] == {"connector": ["buffers", "full"]}
    last = json.loads((ck / "ckpt-s1-000002" / "progress.json").read_text())
    assert last["components"] == {"connector": ["buffers", "full"], "language": ["lora"],
                                  "language_expert": ["full"]}
    init = seen["init"]
    trained = {k.replace(".base_layer.", "."): v for k, v in seen["trained"].items() if "lora_" not in k}
    assert set(trained) == set(init)
    moved = {k for k, v in init.items() if not torch.equal(v, trained[k])}
    assert any(k.startswith("lm_modules.language_expert.expert.") for k in moved)
    assert any(k.startswith("connector.expert.") for k in moved)
    assert not any(k.startswith(("language_model.", "vision_towers.")) for k in moved)  # the LM moved by LoRA only


def test_export_keeps_experts_unmerged_and_reloads_identical_logits(recipe):
    trainer, seen = recipe
    final = trainer.run_dir / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["connector_type"] == "hyper_mlp2x_gelu"
    assert config["lm_modules"] == [{"type": "hyper_expert", "name": "language_expert", "options": SMALL}]
    reloaded = VlweaveForConditionalGeneration.from_pretrained(final).eval()
    state = reloaded.state_dict()
    for key in (k for k in seen["trained"] if ".expert." in k):
        torch.testing.assert_close(state[key], seen["trained"][key], atol=0, rtol=0, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**seen["inputs"]).logits, seen["logits"], atol=1e-5, rtol=0)
        reloaded.lm_modules["language_expert"].detach()  # without the language expert: different answers
        assert not torch.allclose(reloaded(**seen["inputs"]).logits, seen["logits"], atol=1e-4)
    model, tok = load_checkpoint(final)
    assert isinstance(model.connector, HyperVisualConnector) and list(model.lm_modules) == ["language_expert"]


@pytest.mark.parametrize("ckpt", ["ckpt-s1-000001", "ckpt-s0-000002"])
def test_recipe_resumes_exactly(recipe, tmp_path, ckpt):
    trainer, _ = recipe
    cfg = recipe_cfg(Path(trainer.cfg.train.output_dir).parent, "unused")
    cfg.train.output_dir = str(tmp_path / "B")
    resumed = Trainer(cfg, progress=False)
    resumed.train(resume=trainer.run_dir / "checkpoints" / ckpt)
    a, b = losses(trainer.metrics), losses(resumed.metrics)
    assert len(a) == len(b) == 4
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-6, rtol=0)
    sa, sb = (load_checkpoint(t.run_dir / "final")[0].state_dict() for t in (trainer, resumed))
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], atol=1e-6, rtol=0, msg=key)


def test_cli_eval_and_chat_run_the_hyper_checkpoint(recipe, tmp_path, capsys):
    from vlweave.cli import main
    from vlweave.data.questions import Question
    from vlweave.eval.vqa import generate_answers

    trainer, _ = recipe
    final, cfg = trainer.run_dir / "final", trainer.cfg
    assert main(["eval", str(final), "--data", cfg.eval.data, "--batch-size", "3", "--max-new-tokens", "3",
                 "--output", str(tmp_path / "eval")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 6
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    model, tok = load_checkpoint(final)
    image = sorted((Path(cfg.data.train).parent / "images").glob("*.png"))[0]
    assert main(["chat", str(final), "--image", str(image), "--prompt", "What color?", "--max-new-tokens", "4"]) == 0
    (expected,) = generate_answers(model, tok, [Question(question_id="c", image=str(image), text="What color?")],
                                   batch_size=1, max_new_tokens=4, progress=False)
    assert capsys.readouterr().out == expected + "\n"
    assert len(rows) == 6


# ---- baselines: static adapters of the same size, matched LoRA ---------------------------------------------------


def test_matched_static_adapter_and_lora_sizes(tmp_path):
    cfg = hyper_run(tmp_path, modules=[EXPERT])
    model, _ = build_model(cfg)
    sizes = matched_sizes(model, cfg.train.lora.target_modules)
    vis, lang = sizes["visual_expert"], sizes["language_expert"]
    assert vis["parameters"] == sum(p.numel() for p in model.connector.expert.parameters())
    assert lang["layers"] == [2, 3] and lang["guidance_layer"] == 1 and lang["lora_top_layers"] == 2
    # The static twins with the matched bottlenecks: the same places, as many parameters (to one bottleneck unit).
    static_cfg = hyper_run(tmp_path, options={"dynamic": False, "bottleneck": vis["static_bottleneck"]},
                           modules=[LMModuleConfig(type="hyper_expert", name="language_expert",
                                                   options={"dynamic": False,
                                                            "bottleneck": lang["static_bottleneck"]})])
    static, _ = build_model(static_cfg)
    n_vis = sum(p.numel() for p in static.connector.expert.parameters())
    n_lang = sum(p.numel() for p in static.lm_modules["language_expert"].parameters())
    assert abs(n_vis - vis["parameters"]) <= (32 + 64) / 2 and abs(n_lang - lang["parameters"]) <= 2 * 64
    assert static.connector.expert.generated_numel() == 0  # not dynamic: nothing generated
    # LoRA of the matched rank on the same blocks: r * sum(in + out) of the targets there.
    per_rank = lora_parameters_per_rank(model.language_model, cfg.train.lora.target_modules, [2, 3])
    hidden, inter, kv = 64, 128, 2 * 16
    assert per_rank == 2 * (2 * (hidden + hidden) + 2 * (hidden + kv) + 3 * (hidden + inter))
    assert abs(lang["lora_rank"] * per_rank - lang["parameters"]) <= per_rank / 2


def test_static_adapter_is_the_same_computation_for_every_sample(tmp_path):
    cfg = hyper_run(tmp_path, options={"dynamic": False}, modules=[
        LMModuleConfig(type="hyper_expert", name="language_expert", options={"dynamic": False, "layers": [0, 3]})])
    model, tok = build_model(cfg)  # a static adapter needs no guidance, so it may sit before the guidance block
    perturb(model)
    model.eval()
    prompts = prompts_for(model, tok, [True, True])
    pixels = pixels_for(model, 2)
    both = generate(model, tok, prompts, pixels)
    assert generate(model, tok, prompts[1:], pixels[1:]).tolist()[0] == both.tolist()[1]


def test_presets_load_and_declare_the_recipe():
    for name in ("hyperllava", "hyperllava-llm-frozen", "hyperllava-llm-lora", "hyperllava-dci", "demo-hyperllava"):
        cfg = RunConfig.load(preset_path(name))
        assert cfg.connector.type.startswith("hyper_")
        assert [m.name for m in cfg.language.modules] == ["language_expert"]
        align, finetune = cfg.train.stages
        assert align.tune == {"vision": "frozen", "connector": "full", "language": "frozen"}
        assert finetune.tune["language_expert"] == "full" and finetune.tune["connector"] == "full"
    policies = {n: RunConfig.load(preset_path(n)).train.stages[1].tune["language"]
                for n in ("hyperllava", "hyperllava-llm-frozen", "hyperllava-llm-lora")}
    assert policies == {"hyperllava": "full", "hyperllava-llm-frozen": "frozen", "hyperllava-llm-lora": "lora"}
    # The comparison rows: the same stages and LM policy (frozen), differing only beside the connector.
    rows = {n: RunConfig.load(preset_path(f"hyper-compare-{n}")) for n in
            ("static", "visual", "language", "both", "static-adapter", "lora", "dci")}
    assert {n: (c.connector.type, [m.options for m in c.language.modules], c.train.stages[1].tune.get("language"))
            for n, c in rows.items()} == {
        "static": ("mlp2x_gelu", [], "frozen"), "visual": ("hyper_mlp2x_gelu", [], "frozen"),
        "language": ("mlp2x_gelu", [{}], "frozen"), "both": ("hyper_mlp2x_gelu", [{}], "frozen"),
        "static-adapter": ("hyper_mlp2x_gelu", [{"dynamic": False, "bottleneck": 118}], "frozen"),
        "lora": ("mlp2x_gelu", [], "lora"), "dci": ("hyper_dense_dci", [{}], "frozen")}
    assert rows["static-adapter"].connector.options["bottleneck"] == 1086 and rows["lora"].train.lora.r == 13
    assert len({(c.train.stages[0].max_steps, c.train.stages[1].max_steps, c.eval.limit) for c in rows.values()}) == 1


# ---- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options,match", [
    ({"guidance_layer": 4}, r"option 'guidance_layer' = 4: needs a decoder block index in \[-4, 4\) \(the LM has 4"),
    ({"layers": [1, 9]}, r"option 'layers' = \[1, 9\]: needs decoder block indices in \[-4, 4\)"),
    ({"layers": []}, r"option 'layers' = \[\]: needs decoder block indices in \[-4, 4\)"),
    ({"bottleneck": 0}, r"option 'bottleneck' must be >= 1, got 0"),
    ({"embed_dim": 0}, r"option 'embed_dim' must be >= 1, got 0"),
    ({"guidance_pool": "median"}, r"option 'guidance_pool' must be one of 'mean', 'last'"),
])
def test_bad_language_expert_options(tmp_path, options, match):
    cfg = hyper_run(tmp_path, connector="mlp2x_gelu",
                    modules=[LMModuleConfig(type="hyper_expert", name="language_expert", options=options)])
    with pytest.raises(ValueError, match=r"lm module 'language_expert': " + match):
        build_model(cfg)


def test_an_lm_the_expert_cannot_wrap_is_refused(tmp_path):
    cfg = hyper_run(tmp_path, language="phi", connector="mlp2x_gelu")
    with pytest.raises(ValueError, match=r"lm module 'language_expert' \(PhiForCausalLM\): the language expert cannot "
                                         r"wrap decoder block 2 \(PhiDecoderLayer, children .*'post_attention_layernorm'"):
        build_model(cfg)


@pytest.mark.parametrize("connector,options,match", [
    ("hyper_linear", {}, r"hyper_linear: option 'placement' = 'ev1' needs a projector of depth >= 2 \(mlpNx_gelu "
                         r"with N >= 2.*has 1 Linear"),
    ("hyper_mlp1x_gelu", {"placement": "ev2"}, r"option 'placement' = 'ev2' needs a projector of depth >= 2"),
    ("hyper_identity", {}, r"hyper_identity: the visual expert wraps a LLaVA projector .* the inner connector has 0"),
    ("hyper_mlp2x_gelu", {"bottleneck": 0}, r"option 'bottleneck' must be >= 1, got 0"),
    ("hyper_mlp2x_gelu", {"placement": "ev3"}, r"option 'placement' must be one of 'ev1', 'ev2', 'both'"),
    ("hyper_mlp2x_gelu", {"poool": 2}, r"unknown option\(s\) \['poool'\].*the visual expert's own options: "),
    ("hyper_hyper_mlp2x_gelu", {}, r"the inner connector must be a non-hyper connector type"),
    ("hyper_nothing", {}, r"unknown connector type 'nothing'"),
])
def test_bad_visual_expert_input(tmp_path, connector, options, match):
    cfg = hyper_run(tmp_path, modules=[])
    model, _ = build_model(cfg)
    spec = model.connector_spec()
    spec = dataclasses.replace(spec, options=options)
    if connector == "hyper_identity":  # identity needs a tower as wide as the LM
        spec = dataclasses.replace(spec, vision_hidden_size=spec.text_hidden_size)
    with pytest.raises(ValueError, match=match):
        build_connector(connector, spec)


def test_visual_expert_wraps_a_multi_tower_connector_and_processors_see_the_inner_one(tmp_path):
    """``hyper_tower_concat``: the expert on a connector over two named towers (its tower layers, cache signature
    and token count are the inner connector's); a processor made from the config alone expands <image> alike."""
    from vlweave.config import VisionConfig
    from vlweave.processor import VlweaveProcessor

    cfg = hyper_run(tmp_path, connector="hyper_tower_concat", modules=[])
    cfg.towers = {"second": VisionConfig(name="siglip_vision_model", image_size=32, random_init=True, select_layer=-2,
                                         config_overrides={"hidden_size": 24, "intermediate_size": 48,
                                                           "num_hidden_layers": 2, "num_attention_heads": 2,
                                                           "patch_size": 8, "image_size": 32})}
    model, tok = build_model(cfg)
    conn = model.connector
    assert set(conn.tower_layers()) == {"base", "second"} and conn.expert.sites == {"ev1": (32 + 24, 64)}
    assert conn.prepare_signature("second") == conn.inner.prepare_signature("second")
    processor = VlweaveProcessor.from_config(model.config, tok)
    assert processor.num_image_tokens == model.num_image_tokens == conn.inner.num_tokens()
    pixels = {name: pixels_for(model, 2) for name in ("base", "second")}
    with torch.no_grad():
        before = conn(model.tower_features(pixels)).tokens
        perturb(model)
        after = conn(model.tower_features(pixels)).tokens
    assert before.shape == after.shape == (2, model.num_image_tokens, 64) and not torch.allclose(before, after)


def test_lmms_eval_loglikelihood_scores_the_continuation_with_the_prompts_guidance(tmp_path):
    """The plugin scores prompt + continuation in one forward; the guidance must be the prompt's alone, i.e. what
    a generation would have used: the same log-probs as feeding the continuation through the KV cache."""
    from helpers import draw_image
    from vlweave.builder import save_checkpoint
    from vlweave.integrations import lmms_eval as plugin
    from PIL import Image

    class Request:
        def __init__(self, *args):
            self.args = args

    cfg = hyper_run(tmp_path, language="qwen2")
    model, tok = build_model(cfg)
    perturb(model, std=0.3)
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt")
    docs = []
    for i, color in enumerate(["red", "blue"]):
        draw_image(color, "square", size=32).save(tmp_path / f"im{i}.png")
        docs.append({"question": f"What color is it {i}?", "image": str(tmp_path / f"im{i}.png")})
    lm = plugin.VlweaveLMM(pretrained=str(ckpt), batch_size=2)
    lm.task_dict = {"t": {"test": docs}}
    visual = lambda doc: [Image.open(doc["image"]).convert("RGB")]  # noqa: E731
    conts = [" red circle", " blue"]
    got = lm.loglikelihood([Request(d["question"], c, visual, i, "t", "test") for i, (d, c) in
                            enumerate(zip(docs, conts))])
    model, tok = load_checkpoint(ckpt)
    model.eval()
    for (value, _), doc, cont in zip(got, docs, conts):
        prompt = lm.processor.encode_question(doc["question"], True, sample_id="x")
        target = tok(cont, add_special_tokens=False)["input_ids"]
        pixels = lm.processor.pixel_values([Image.open(doc["image"]).convert("RGB")])
        ctx = VlweaveContext.for_batch([True])
        ids = torch.tensor([prompt + target])
        with torch.no_grad():  # prefill on the prompt, then the continuation as cached decode steps
            out = model(input_ids=ids[:, :len(prompt)], pixel_values=pixels, use_cache=True, context=ctx)
            rest = model(input_ids=ids[:, len(prompt):], past_key_values=out.past_key_values, use_cache=True,
                         context=ctx)
        logits = torch.cat([out.logits[:, -1:], rest.logits[:, :-1]], dim=1).float().log_softmax(-1)[0]
        direct = float(logits.gather(-1, torch.tensor(target)[:, None]).sum())
        assert value == pytest.approx(direct, abs=2e-4)  # with the continuation in the guidance: off by ~2e-3


def test_guidance_norm_layer_makes_the_generated_weights_scale_free():
    """``guidance_norm: layer`` (the language expert's default) normalises the guidance before the encoders, so an
    LLM residual stream's growing scale cannot blow the hypernetwork up; ``none`` reads it as given."""
    torch.manual_seed(0)
    sites = {"a": (6, 6)}
    g = torch.randn(3, 10)
    out = {}
    for norm in ("none", "layer"):
        torch.manual_seed(1)
        expert = DynamicExpert(sites, guidance_dim=10, options=HyperExpertOptions(zero_init=False, guidance_norm=norm))
        out[norm] = (expert.generate("a", g).down, expert.generate("a", 100 * g + 3).down)
    small, big = out["layer"]
    assert torch.allclose(small, big, atol=1e-4)  # LayerNorm(100 g + 3) == LayerNorm(g)
    assert not torch.allclose(*out["none"], atol=1e-2)
    from vlweave.language.hyper_expert import LanguageExpertOptions

    assert LanguageExpertOptions().guidance_norm == "layer" and HyperExpertOptions().guidance_norm == "none"
