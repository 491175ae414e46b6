"""``hyper_expert``: HyperLLaVA's dynamic language expert (methods.md §3a "Language expert", Eq. 7), an LM-side module.

In each configured decoder block ``i`` an adapter whose weights a HyperNetwork generates per sample runs parallel
to the FFN: ``x' = x_L + FFN(norm(x_L)) + E_i(x_L)``, ``x_L`` being the residual stream after the block's
self-attention.  The guidance is the output of one middle block, pooled over the prompt's tokens, so the blocks
after it see a per-sample adapter; everything generic (encoders, shared HyperNetwork, batched matmuls, zero init)
is :class:`vlweave.hyper.expert.DynamicExpert`.

Options (:class:`LanguageExpertOptions`; defaults are the paper's or, where it is silent, its most likely reading):

- ``layers`` (decoder block indices, negatives from the top; default ``None`` = the posterior half,
  ``n//2 .. n-1``: blocks 17-32 of 32, Table 3's best);
- ``guidance_layer`` (default ``None`` = ``n//2 - 1``, the output of the middle block: "½ Layers" of Fig. 3, block
  16 of 32).  When every expert block comes after it, the guidance is taken in the same forward, when that block
  has run; when some come before or at it (Table 3's "anterior 16" and "all 32"), a separate pass over the prompt
  up to the guidance block, with the experts off, computes it first (once per sequence, like the rest);
- ``guidance_pool`` (``mean`` over the prompt's tokens, or ``last``: the prompt's last token);
- ``guidance_tokens`` (``prompt``: the attended tokens before each row's first supervised token in training --
  exactly what generation sees at prefill, so training and decoding agree; ``all``: every attended token, the
  answer included in training);
- ``adapter_input`` (``residual``: ``x_L`` as Eq. 7 writes it; ``normed``: the FFN's normalised input);
- ``guidance_norm`` (``layer``, the default here: the pooled guidance LayerNorm-ed, no affine, before the encoders;
  ``none``: as it comes out of the block, whose scale made the first comparison run diverge);
- the expert's own: ``embed_dim`` 64, ``bottleneck`` 16, ``hyper_hidden``, ``hyper_activation``, ``activation``,
  ``share_hypernetwork`` (one H for all blocks, per-block encoders), ``zero_init``, ``scale``.

Decoding (the paper does not discuss it; methods.md §3a ASSUMPTION): the guidance and the generated weights are
computed once per sequence, at the forward that sees its prompt, and kept in ``context.guidance[<name>]`` for every
cached decode step.  A later full-sequence forward with the same context whose inputs extend that prompt (the
same mask and embeddings on the prompt's positions: ``generate(use_cache=False)``) reuses them, so cached and
uncached generation agree; any other input recomputes them.

Decoder blocks supported: those with ``post_attention_layernorm`` + ``mlp`` (Llama, Qwen2, Mistral, SmolLM2, ...:
``x_L`` is the norm's input, the expert is added to the MLP's output) and Gemma 2/3's sandwich norms
(``pre_feedforward_layernorm`` / ``post_feedforward_layernorm``: added after the post-FFN norm, so the residual sum
is the same).  Any other block is refused with the list of its children.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from vlweave.hyper.expert import DynamicExpert, GeneratedAdapters, HyperExpertOptions, masked_mean
from vlweave.language.modules import LMModule, LMModuleSpec, decoder_layers, register_lm_module


@dataclass(frozen=True)
class LanguageExpertOptions(HyperExpertOptions):
    layers: tuple[int, ...] | None = None  # None: the posterior half of the blocks
    guidance_layer: int | None = None  # None: n//2 - 1 (the middle block's output)
    guidance_pool: Literal["mean", "last"] = "mean"
    guidance_tokens: Literal["prompt", "all"] = "prompt"
    adapter_input: Literal["residual", "normed"] = "residual"
    guidance_norm: Literal["none", "layer"] = "layer"  # the residual stream's scale: see HyperExpertOptions


class _GuidanceReady(Exception):
    """Raised by the guidance block's hook to end the separate guidance pass early."""


@dataclass
class SequenceGuidance:
    """What one sequence batch's language expert keeps for its lifetime (``context.guidance[<module name>]``)."""

    mask: torch.Tensor  # [B, L] the prompt's tokens that the guidance pools over
    attention_mask: torch.Tensor | None  # [B, L] as given at the prompt's forward
    embeds: torch.Tensor  # [B, L, D] the prompt's input embeddings (to recognise the same prompt again)
    vector: torch.Tensor | None = None  # [B, D] pooled guidance, once the guidance block has run
    weights: dict[str, GeneratedAdapters] | None = None  # per expert block, generated once

    def extends(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
        """Whether a full-sequence input is this prompt followed by more tokens (uncached generation)."""
        b, n = self.embeds.shape[:2]
        if self.vector is None or embeds.shape[0] != b or embeds.shape[1] < n:
            return False
        if (attention_mask is None) != (self.attention_mask is None):
            return False
        if attention_mask is not None and not torch.equal(attention_mask[:, :n], self.attention_mask):
            return False
        return torch.equal(embeds[:, :n], self.embeds)


def ffn_sites(layer: nn.Module, index: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """``(norm before the FFN, FFN, module whose output the expert is added to)`` of a decoder block."""
    if all(hasattr(layer, a) for a in ("pre_feedforward_layernorm", "post_feedforward_layernorm", "mlp")):
        return layer.pre_feedforward_layernorm, layer.mlp, layer.post_feedforward_layernorm
    if all(hasattr(layer, a) for a in ("post_attention_layernorm", "mlp")):
        return layer.post_attention_layernorm, layer.mlp, layer.mlp
    children = [n for n, _ in layer.named_children()]
    raise ValueError(
        f"the language expert cannot wrap decoder block {index} ({type(layer).__name__}, children {children}): it "
        "needs the post-attention residual and the FFN, i.e. 'post_attention_layernorm' + 'mlp' (Llama, Qwen2, "
        "Mistral, SmolLM2) or 'pre_feedforward_layernorm' + 'mlp' + 'post_feedforward_layernorm' (Gemma 2/3)")


@register_lm_module("hyper_expert")
class LanguageExpert(LMModule):
    options_class = LanguageExpertOptions
    options: LanguageExpertOptions

    def __init__(self, spec: LMModuleSpec) -> None:
        super().__init__(spec)
        n = spec.num_layers
        opts = self.options
        g = opts.guidance_layer if opts.guidance_layer is not None else n // 2 - 1
        if not -n <= g < n:
            raise ValueError(f"option 'guidance_layer' = {g}: needs a decoder block index in [{-n}, {n}) (the LM "
                             f"has {n} blocks)")
        self.guidance_index = g % n
        layers = opts.layers if opts.layers is not None else tuple(range(n // 2, n))
        bad = [i for i in layers if not -n <= i < n]
        if bad or not layers:
            raise ValueError(f"option 'layers' = {list(layers)}: needs decoder block indices in [{-n}, {n}) (the LM "
                             f"has {n} blocks)")
        self.layer_indices = sorted({i % n for i in layers})
        # Expert blocks at or before the guidance block need the guidance before the forward reaches them: it is
        # then computed by a separate pass over the prompt up to the guidance block, with the experts off.
        self.separate_pass = opts.dynamic and self.layer_indices[0] <= self.guidance_index
        d = spec.hidden_size
        self.expert = DynamicExpert({str(i): (d, d) for i in self.layer_indices}, guidance_dim=d, options=opts)
        self._captured: dict[int, torch.Tensor] = {}  # x_L between the pre-hook and the add hook of one block
        self._model: tuple[Any, ...] = ()  # (the model,) once attached
        self.guidance_computations = 0  # how many times a guidance vector was pooled (tests count it)
        self._in_guidance_pass = False

    # ---- installation ----------------------------------------------------------------------------------
    def attach(self, model: Any) -> None:
        layers = decoder_layers(model.language_model)
        if len(layers) != self.spec.num_layers:
            raise ValueError(f"lm module {self.spec.name!r}: built for {self.spec.num_layers} decoder blocks, the LM "
                             f"has {len(layers)}")
        # The model is held in a tuple, not as an attribute module: it must not become a child (it would be saved
        # twice), and a deepcopy of the model still maps it to the copy (a closure would keep the original).
        self._model = (model,)
        model.register_prefill_hook(self.spec.name, self._prefill)
        if self.options.dynamic:  # a static adapter (the same-size baseline) needs no guidance
            self._handles.append(layers[self.guidance_index].register_forward_hook(self._after_guidance_block))
        for i in self.layer_indices:
            try:
                norm, ffn, add_to = ffn_sites(layers[i], i)
            except ValueError as err:
                raise ValueError(f"lm module {self.spec.name!r} ({type(model.language_model).__name__}): {err}") \
                    from None
            if self.options.adapter_input == "residual":
                self._handles.append(norm.register_forward_pre_hook(partial(self._capture_input, i)))
            else:
                self._handles.append(ffn.register_forward_pre_hook(partial(self._capture_input, i)))
            self._handles.append(add_to.register_forward_hook(partial(self._add_expert, i)))

    # ---- per-sequence guidance -------------------------------------------------------------------------
    def _state(self) -> SequenceGuidance:
        """The running forward's per-sequence state (``model.active_context.guidance[<name>]``)."""
        context = self._model[0].active_context if self._model else None
        entry = None if context is None else context.guidance.get(self.spec.name)
        if not isinstance(entry, SequenceGuidance):
            raise ValueError(f"lm module {self.spec.name!r}: no guidance for this forward (a cached decode step "
                             "needs the VlweaveContext its prefill used; generate() passes it)")
        return entry

    def _prefill(self, model: Any, context: Any, embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        lm = model.language_model
        checkpointing = getattr(lm, "is_activation_checkpointing", None)  # transformers >= 5 name
        if checkpointing is None:
            checkpointing = getattr(lm, "is_gradient_checkpointing", False)
        if torch.is_grad_enabled() and checkpointing:
            # A recomputed block would reuse the per-sequence weights generated in the first pass.
            raise ValueError(f"lm module {self.spec.name!r}: training with gradient checkpointing of the LM is not "
                             "supported by the language expert; disable it")
        current = context.guidance.get(self.spec.name)
        if isinstance(current, SequenceGuidance) and current.extends(embeds, attention_mask):
            return  # the same prompt again, longer (uncached generation): keep its guidance
        b, n = embeds.shape[:2]
        mask = torch.ones(b, n, dtype=torch.bool, device=embeds.device)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()
        prompt = getattr(context, "prompt_mask", None)
        if self.options.guidance_tokens == "prompt" and prompt is not None and prompt.shape == mask.shape:
            mask = mask & prompt.to(mask.device).bool()
        state = SequenceGuidance(
            mask=mask, attention_mask=None if attention_mask is None else attention_mask.detach().clone(),
            embeds=embeds.detach())
        if not self.options.dynamic:
            state.vector, state.weights = torch.zeros(0), {}
        context.guidance[self.spec.name] = state
        if self.separate_pass:
            self._guidance_pass(model, embeds, attention_mask)

    def _guidance_pass(self, model: Any, embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Run the decoder over the prompt up to the guidance block (experts off), which fills the guidance.
        Positions come from the mask (as generation makes them), so a left-padded row sees what it sees alone."""
        if attention_mask is None:
            attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        self._in_guidance_pass = True
        try:
            model.language_model.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                               position_ids=position_ids, use_cache=False)
        except _GuidanceReady:
            pass
        finally:
            self._in_guidance_pass = False
        if self._state().vector is None:
            raise ValueError(f"lm module {self.spec.name!r}: the guidance pass did not reach block "
                             f"{self.guidance_index}")

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Guidance ``[B, D]`` from the guidance block's output ``[B, L, D]`` over the prompt mask ``[B, L]``."""
        self.guidance_computations += 1
        if self.options.guidance_pool == "last":
            n = mask.shape[1]
            positions = torch.arange(n, device=mask.device).expand_as(mask)
            last = torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1).clamp_min(0)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
        return masked_mean(hidden, mask)

    def _after_guidance_block(self, module: nn.Module, args: Any, output: Any) -> None:
        state = self._state()
        if state.vector is not None:
            return

        hidden = output[0] if isinstance(output, tuple) else output
        if hidden.shape[1] != state.mask.shape[1]:
            raise ValueError(f"lm module {self.spec.name!r}: the prompt forward has {state.mask.shape[1]} tokens, "
                             f"the guidance block gave {hidden.shape[1]}")
        state.vector = self.pool(hidden, state.mask)
        state.weights = {}
        if self._in_guidance_pass:
            raise _GuidanceReady  # the rest of the pass is not needed

    # ---- the experts -----------------------------------------------------------------------------------
    def _capture_input(self, index: int, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._captured[index] = args[0]

    def _add_expert(self, index: int, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        x = self._captured.pop(index)
        if self._in_guidance_pass:
            return output  # the guidance pass runs the LM without experts
        state = self._state()
        if state.vector is None or state.weights is None:
            raise ValueError(f"lm module {self.spec.name!r}: expert block {index} ran before the guidance block "
                             f"{self.guidance_index}")
        key = str(index)
        weights = state.weights.get(key)
        if weights is None:
            weights = state.weights[key] = self.expert.generate(key, state.vector)
        return output + self.expert.apply(weights, x).to(output.dtype)

    # ---- facts -----------------------------------------------------------------------------------------
    def generated_numel_per_sample(self) -> int:
        return self.expert.generated_numel()


__all__ = ["LanguageExpert", "LanguageExpertOptions", "SequenceGuidance", "ffn_sites"]
