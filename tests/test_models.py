import pytest
import torch

from sr_finetune.errors import MissingDependencyError
from sr_finetune.models import load_pipeline, resolve_dtype, set_attention_backend, xformers_available


def test_resolve_dtype_names():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("no") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")


def test_pipeline_uses_sdpa_by_default_and_requested_scheduler(tiny_sd):
    pipe = load_pipeline(str(tiny_sd), scheduler="ddim")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}
    set_attention_backend(pipe, "eager")
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor"}


@pytest.mark.skipif(xformers_available(), reason="xformers is installed here")
def test_xformers_missing_is_a_clear_error(tiny_sd):
    pipe = load_pipeline(str(tiny_sd))
    with pytest.raises(MissingDependencyError, match=r"pip install 'sr-finetune\[xformers\]'"):
        set_attention_backend(pipe, "xformers")


def test_unknown_scheduler_is_refused(tiny_sd):
    with pytest.raises(ValueError, match="unknown scheduler 'foo'"):
        load_pipeline(str(tiny_sd), scheduler="foo")
