"""Building models whose every weight comes from a checkpoint, without memory or random init.

The modules are built on the meta device (shapes only) and the checkpoint's tensors are then
assigned as their parameters (``load_state_dict(..., assign=True)``): no random initialisation
and no second copy. At the real sizes this is most of the loading time; an open_clip ViT-H-14
spent about 15 s drawing a billion random weights only to overwrite them.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Callable, TypeVar

import torch

from sr_finetune.errors import UserError

M = TypeVar("M", bound=torch.nn.Module)


def build_on_meta(factory: Callable[[], M]) -> M:
    """``factory()`` with every tensor it creates on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return factory()


def read_checkpoint_mapped(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` with the file memory-mapped (no read buffer; a
    billion fp16 weights then cast to fp32 take a few seconds less). Copy what you keep: the
    tensors refer to the file (weights used in place from the mapping made the forwards slower
    at real sizes: 4 KiB file pages, which memory pressure can drop and read again). Files in
    torch's legacy format are read the ordinary way."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def restore_causal_mask(model: torch.nn.Module) -> None:
    """Rebuild open_clip's non-persistent causal ``attn_mask`` buffer (never in a checkpoint) as
    open_clip builds it: -inf above the diagonal, 0 elsewhere."""
    mask = getattr(model, "attn_mask", None)
    if isinstance(mask, torch.Tensor) and mask.is_meta:
        size = mask.shape[0]
        model.attn_mask = torch.empty(size, size).fill_(float("-inf")).triu_(1)


def ensure_materialized(model: torch.nn.Module, source: object) -> None:
    """A one-line error naming the weights that ``source`` did not provide (still on meta)."""
    missing = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if missing:
        raise UserError(f"{source} does not provide {len(missing)} weights of the model (e.g. {', '.join(missing[:3])})")


__all__ = ["build_on_meta", "ensure_materialized", "read_checkpoint_mapped", "restore_causal_mask"]
