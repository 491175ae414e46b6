"""EfficientNet-Lite as an HF ``PreTrainedModel`` vision tower (a CNN: its "tokens" are feature-map positions).

A clean re-implementation of the EfficientNet-Lite architecture (Tan & Le 2019, TF ``efficientnet/lite``): the
EfficientNet-B0 layout with ReLU6 instead of swish, no squeeze-and-excitation, and TensorFlow "SAME" padding.
Importing this module registers the config/model with ``AutoConfig``/``AutoModel`` under
``model_type = "vlweave_efficientnet_lite"``, so a converted folder loads with ``AutoModel.from_pretrained``.

``forward(pixel_values, output_hidden_states=True)`` returns a ``BaseModelOutput`` whose ``last_hidden_state`` is the
final 1280-channel map flattened row-major to ``[B, H*W, 1280]`` (``[B, 49, 1280]`` at 224 px) and whose
``hidden_states`` are ``(stem, stage 1, ..., stage 7, head)`` maps flattened the same way (their ``N`` and ``C``
differ per entry; ``len == config.num_hidden_layers + 1``).

:func:`convert_package_state_dict` maps the ``efficientnet-lite-pytorch`` package's state-dict keys (lukemelas
``EfficientNet`` naming) onto this model's keys.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput

# (repeats, kernel, stride, expand_ratio, out_channels) per stage; Lite0 = EfficientNet-B0's blocks, and the Lite
# family keeps the stem (32) and head (1280) widths unscaled.
LITE0_STAGES: list[list[int]] = [
    [1, 3, 1, 1, 16],
    [2, 3, 2, 6, 24],
    [2, 5, 2, 6, 40],
    [3, 3, 2, 6, 80],
    [3, 5, 1, 6, 112],
    [4, 5, 2, 6, 192],
    [1, 3, 1, 6, 320],
]


class EfficientNetLiteConfig(PretrainedConfig):
    """Configuration of :class:`EfficientNetLiteVisionModel` (defaults: EfficientNet-Lite0 at 224 px)."""

    model_type = "vlweave_efficientnet_lite"

    def __init__(
        self,
        image_size: int = 224,
        num_channels: int = 3,
        stem_channels: int = 32,
        hidden_size: int = 1280,
        stages: list[list[int]] | None = None,
        batch_norm_eps: float = 1e-3,
        batch_norm_momentum: float = 0.01,
        **kwargs,
    ) -> None:
        self.image_size = image_size
        self.num_channels = num_channels
        self.stem_channels = stem_channels
        self.hidden_size = hidden_size  # channels of the head's feature map == token width of last_hidden_state
        self.stages = [list(s) for s in (stages or LITE0_STAGES)]
        self.batch_norm_eps = batch_norm_eps
        self.batch_norm_momentum = batch_norm_momentum  # PyTorch convention (TF's 0.99 decay)
        # Derived facts, stored so that generic tower code can read them like a ViT's:
        # the total stride plays the role of a patch size, and there is one hidden state per stage plus stem+head.
        self.patch_size = 2 * math.prod(s[2] for s in self.stages)
        self.num_hidden_layers = len(self.stages) + 1
        kwargs.pop("patch_size", None)
        kwargs.pop("num_hidden_layers", None)
        super().__init__(**kwargs)


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding: output = ceil(input / stride), the extra pixel (if any) going right/bottom."""
    ih, iw = x.shape[-2:]
    pad_h = max((math.ceil(ih / stride) - 1) * stride + kernel - ih, 0)
    pad_w = max((math.ceil(iw / stride) - 1) * stride + kernel - iw, 0)
    if pad_h or pad_w:
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
    return x


class ConvNorm(nn.Module):
    """Bias-free conv (TF SAME padding, computed per input size) + BatchNorm + optional ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, config: EfficientNetLiteConfig,
                 groups: int = 1, act: bool = True) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(cout, eps=config.batch_norm_eps, momentum=config.batch_norm_momentum)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel > 1:
            x = _same_pad(x, self.kernel, self.stride)
        return self.act(self.norm(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (if ratio > 1) -> depthwise kxk -> 1x1 linear projection (+ identity skip)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int,
                 config: EfficientNetLiteConfig) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = ConvNorm(cin, mid, 1, 1, config) if expand != 1 else None
        self.depthwise = ConvNorm(mid, mid, kernel, stride, config, groups=mid)
        self.project = ConvNorm(mid, cout, 1, 1, config, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(x) if self.expand is not None else x
        h = self.project(self.depthwise(h))
        # Stochastic depth (drop-connect) is a training regulariser of the original; as a frozen or lightly
        # tuned tower it is omitted, which is exactly the original's eval-mode behaviour.
        return h + x if self.residual else h


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C], row-major over the grid."""
    return x.flatten(2).transpose(1, 2)


class EfficientNetLitePreTrainedModel(PreTrainedModel):
    config_class = EfficientNetLiteConfig
    config: EfficientNetLiteConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["MBConv"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            if getattr(module, "num_batches_tracked", None) is not None:
                init.zeros_(module.num_batches_tracked)


class EfficientNetLiteVisionModel(EfficientNetLitePreTrainedModel):
    """EfficientNet-Lite feature extractor (no classifier) returning flattened feature maps as tokens."""

    def __init__(self, config: EfficientNetLiteConfig) -> None:
        super().__init__(config)
        self.stem = ConvNorm(config.num_channels, config.stem_channels, 3, 2, config)
        stages = []
        cin = config.stem_channels
        for repeats, kernel, stride, expand, cout in config.stages:
            blocks = [MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand, config)
                      for i in range(repeats)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.head = ConvNorm(cin, config.hidden_size, 1, 1, config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = True if return_dict is None else return_dict
        x = self.stem(pixel_values.to(self.stem.conv.weight.dtype))
        maps = [x]
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        x = self.head(x)
        maps.append(x)
        last = _tokens(x)
        hidden = tuple(_tokens(m) for m in maps) if output_hidden_states else None
        if not return_dict:
            return (last, hidden) if hidden is not None else (last,)
        return BaseModelOutput(last_hidden_state=last, hidden_states=hidden)


def convert_package_state_dict(state_dict: dict[str, torch.Tensor],
                               stages: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """lukemelas-style ``EfficientNet`` keys (efficientnet-lite-pytorch) -> :class:`EfficientNetLiteVisionModel` keys.

    The package numbers blocks globally (``_blocks.0`` .. ``_blocks.15``); here they are ``stages.<s>.<i>``.  The
    ImageNet classifier (``_fc.*``) is dropped: the tower only exposes features.
    """
    stages = stages or LITE0_STAGES
    block_to_stage: list[tuple[int, int]] = [(s, i) for s, st in enumerate(stages) for i in range(st[0])]
    top = {"_conv_stem": "stem.conv", "_bn0": "stem.norm", "_conv_head": "head.conv", "_bn1": "head.norm"}
    inner = {"_expand_conv": "expand.conv", "_bn0": "expand.norm", "_depthwise_conv": "depthwise.conv",
             "_bn1": "depthwise.norm", "_project_conv": "project.conv", "_bn2": "project.norm"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("_fc."):
            continue
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            s, i = block_to_stage[int(m.group(1))]
            new = f"stages.{s}.{i}.{inner[m.group(2)]}.{m.group(3)}"
        else:
            module, _, param = key.partition(".")
            if module not in top:
                raise KeyError(f"unexpected EfficientNet-Lite key {key!r}")
            new = f"{top[module]}.{param}"
        out[new] = value
    return out


def layer_shapes(config: EfficientNetLiteConfig, image_size: int) -> list[tuple[int, int, int]]:
    """``(channels, grid_h, grid_w)`` of every hidden state (stem, stages, head) at ``image_size`` px: "SAME"
    padding makes each strided layer output ``ceil(input / stride)``."""
    side = math.ceil(image_size / 2)
    shapes = [(config.stem_channels, side, side)]
    for _, _, stride, _, cout in config.stages:
        side = math.ceil(side / stride)
        shapes.append((cout, side, side))
    shapes.append((config.hidden_size, side, side))
    return shapes


def tower_facts(config: EfficientNetLiteConfig, image_size: int):
    """The tower facts vlweave builds connectors from (registered in ``vlweave.vision.towers``)."""
    from vlweave.vision.towers import TowerFacts

    shapes = layer_shapes(config, image_size)
    channels, grid, _ = shapes[-1]
    return TowerFacts(hidden_size=channels, num_layers=len(shapes) - 1, patch_size=image_size // grid,
                      image_size=image_size, num_prefix_tokens=0, layer_shapes=tuple(shapes))


AutoConfig.register(EfficientNetLiteConfig.model_type, EfficientNetLiteConfig, exist_ok=True)
AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteVisionModel, exist_ok=True)
