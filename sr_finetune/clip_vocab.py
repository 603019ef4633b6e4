"""The real CLIP BPE vocabulary, built offline from the file that ships inside open_clip.

OpenAI CLIP, OpenCLIP ViT-H-14 and Stable Diffusion 2.x's text encoder all tokenise with
this vocabulary (49,408 entries). Building a transformers ``CLIPTokenizer`` from it lets the
tiny models tokenise prompts exactly like the real ones, with no hub access.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode, default_bpe

VOCAB_SIZE = 49408
# open_clip keeps the first 49152 - 256 - 2 merges of the file (header line excluded).
_NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


@lru_cache(maxsize=1)
def clip_bpe_merges() -> tuple[str, ...]:
    """The merges of the CLIP BPE file, in order, as ``"a b"`` strings."""
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return tuple(lines[1 : _NUM_MERGES + 1])


def clip_vocab() -> dict[str, int]:
    """Token -> id, in the order of openai/CLIP's ``SimpleTokenizer`` (ids 0..49407)."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(merge.split()) for merge in clip_bpe_merges()]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {token: i for i, token in enumerate(tokens)}


def write_clip_tokenizer(out_dir: str | os.PathLike, pad_token: str = "!", model_max_length: int = 77) -> Path:
    """Write a transformers ``CLIPTokenizer`` folder (vocab.json, merges.txt, configs).

    ``pad_token="!"`` (id 0) is Stable Diffusion 2.x's convention (open_clip zero-pads);
    OpenAI CLIP checkpoints on the hub pad with ``<|endoftext|>``.
    """
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(clip_vocab(), ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(clip_bpe_merges()) + "\n", encoding="utf-8")
    # Written by hand rather than through the constructor, whose signature differs between
    # transformers 4 (file paths) and 5 (in-memory vocab); from_pretrained reads both.
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
        "model_max_length": model_max_length,
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
