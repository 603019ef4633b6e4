"""Which parameters of an OpenAI-layout CLIP a Social Reward run trains: named presets, relative to depth.

The presets are the authors' ``--training_mode`` values (``train_pair_pos_neg.py``), with block
counts stated as a share of OpenAI ViT-L/14's depth (24 visual, 12 text residual blocks), so
that a model of another depth gets the same relative choice: a preset that trains the last
``k`` of 24 visual blocks trains the last ``ceil(k * L / 24)`` of a model's ``L`` (at least one),
and likewise of 12 text blocks. On ViT-L/14 the lists are exactly the authors'; a 2+2-block
tiny CLIP trains its last visual and last text block wherever ViT-L/14 trains 1-4 of them.

| preset | trained |
| --- | --- |
| ``all`` | every parameter except ``logit_scale`` (the score is a raw cosine: it gets no gradient) |
| ``visual`` | all of ``visual`` |
| ``visual_upper_layers`` | last 3 of 24 visual blocks + ``visual.ln_post`` |
| ``visual_upper_layers_textual_upper_layers`` (paper, default) | last 3 of 24 visual blocks + ``visual.ln_post`` + last 2 of 12 text blocks + ``ln_final`` + ``text_projection`` (**not** ``visual.proj``) |
| ``visual_upper_layers_textual_upper_layers_deeper`` | as above with 4 of 24 and 3 of 12 |
| ``visual_last_layer`` | last 1 of 24 visual blocks + ``visual.ln_post`` |

Freezing is real here (``requires_grad=False`` on everything else), so no gradient is computed
for the frozen parts and their activations are not kept. The authors' ``model.requires_grad =
False`` only sets a Python attribute: every parameter still gets a gradient, but their optimiser
steps only the listed ones and no weight decay reaches the others, so the trained weights are
the same; the difference is speed and memory only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

REFERENCE_VISUAL_BLOCKS = 24  # OpenAI ViT-L/14
REFERENCE_TEXT_BLOCKS = 12

_VISUAL_BLOCK = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.")
_TEXT_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")


@dataclass(frozen=True)
class TrainablePreset:
    """Blocks counted from the top, as a number of ViT-L/14's blocks, plus named parameters."""

    visual_blocks: int | None  # last k of 24 visual blocks; None = the whole visual tower
    text_blocks: int = 0  # last k of 12 text blocks
    names: tuple[str, ...] = ()  # parameter name prefixes trained in full
    everything: bool = False

    def trains(self, name: str, visual_depth: int, text_depth: int) -> bool:
        if self.everything:
            return name != "logit_scale"
        if self.visual_blocks is None and name.startswith("visual."):
            return True
        if any(name == prefix or name.startswith(prefix + ".") for prefix in self.names):
            return True
        if (m := _VISUAL_BLOCK.match(name)) and self.visual_blocks:
            return int(m.group(1)) >= visual_depth - scaled_block_count(self.visual_blocks, REFERENCE_VISUAL_BLOCKS, visual_depth)
        if (m := _TEXT_BLOCK.match(name)) and self.text_blocks:
            return int(m.group(1)) >= text_depth - scaled_block_count(self.text_blocks, REFERENCE_TEXT_BLOCKS, text_depth)
        return False


_UPPER_TEXT = ("visual.ln_post", "ln_final", "text_projection")

PRESETS: dict[str, TrainablePreset] = {
    "all": TrainablePreset(visual_blocks=None, everything=True),
    "visual": TrainablePreset(visual_blocks=None),
    "visual_upper_layers": TrainablePreset(visual_blocks=3, names=("visual.ln_post",)),
    "visual_upper_layers_textual_upper_layers": TrainablePreset(visual_blocks=3, text_blocks=2, names=_UPPER_TEXT),
    "visual_upper_layers_textual_upper_layers_deeper": TrainablePreset(visual_blocks=4, text_blocks=3, names=_UPPER_TEXT),
    "visual_last_layer": TrainablePreset(visual_blocks=1, names=("visual.ln_post",)),
}
PAPER_PRESET = "visual_upper_layers_textual_upper_layers"


def scaled_block_count(blocks_of_reference: int, reference_depth: int, depth: int) -> int:
    """``ceil(blocks_of_reference * depth / reference_depth)``, between 1 and ``depth``."""
    return min(depth, max(1, math.ceil(blocks_of_reference * depth / reference_depth)))


def block_depths(model: torch.nn.Module) -> tuple[int, int]:
    """(visual blocks, text blocks) of an open_clip CLIP in the OpenAI layout."""
    return len(model.visual.transformer.resblocks), len(model.transformer.resblocks)


def trainable_parameter_names(model: torch.nn.Module, preset: str) -> list[str]:
    """Names of the parameters ``preset`` trains, in the model's order."""
    rule = PRESETS[preset]
    visual_depth, text_depth = block_depths(model)
    return [name for name, _ in model.named_parameters() if rule.trains(name, visual_depth, text_depth)]


def apply_preset(model: torch.nn.Module, preset: str) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` to train exactly the preset's parameters; return them in model order."""
    chosen = set(trainable_parameter_names(model, preset))
    trained = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
        if name in chosen:
            trained.append(param)
    return trained


def describe_trainable(model: torch.nn.Module, preset: str) -> str:
    """One line: how many parameters the preset trains, of how many, and which blocks."""
    names = trainable_parameter_names(model, preset)
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    trained, total = sum(sizes[n] for n in names), sum(sizes.values())
    visual_depth, text_depth = block_depths(model)
    visual = sorted({int(m.group(1)) for n in names if (m := _VISUAL_BLOCK.match(n))})
    text = sorted({int(m.group(1)) for n in names if (m := _TEXT_BLOCK.match(n))})
    return (
        f"trainable parameters: {trained:,} of {total:,} ({100 * trained / total:.1f}%), preset {preset}: "
        f"visual blocks {_span(visual, visual_depth)}, text blocks {_span(text, text_depth)}"
    )


def _span(blocks: list[int], depth: int) -> str:
    if not blocks:
        return f"none of {depth}"
    return f"{blocks[0]}-{blocks[-1]} of {depth}" if len(blocks) > 1 else f"{blocks[0]} of {depth}"


__all__ = ["PAPER_PRESET", "PRESETS", "TrainablePreset", "apply_preset", "block_depths", "describe_trainable", "scaled_block_count", "trainable_parameter_names"]
