"""open_clip's CLIP text tower run only on the columns up to the batch's last end-of-text token.

CLIP tokenisers pad every prompt to 77 tokens, and open_clip's ``CLIP.encode_text`` always runs
all 77 positions. The tower is causal and pools at the end-of-text token (the row's largest id),
so no position after it can change the embedding: on the columns up to the batch's last
end-of-text token the result is the same (to fp32 rounding) for less work. Real prompts are often
much shorter than 77 tokens (the benchmark's real prompts: 11-76, batch maxima 77, 33 and 42).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _cuts_safely(model: torch.nn.Module) -> bool:
    """An open_clip ``CLIP`` with a causal text tower pooled at the argmax token."""
    return (
        getattr(model, "text_pool_type", None) == "argmax"
        and isinstance(getattr(model, "attn_mask", None), torch.Tensor)
        and all(hasattr(model, name) for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"))
    )


def encode_text_up_to_eot(model: torch.nn.Module, input_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``model.encode_text(input_ids, normalize)`` computed on ``input_ids[:, :last EOT + 1]``
    (open_clip's own ``encode_text`` when the model is not a causal, argmax-pooled CLIP)."""
    if not _cuts_safely(model):
        return model.encode_text(input_ids, normalize=normalize)
    eot = input_ids.argmax(dim=-1)
    length = int(eot.max()) + 1
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(input_ids[:, :length]).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x
