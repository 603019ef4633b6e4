import pandas as pd
import pytest
import torch
from open_clip.tokenizer import tokenize

from conftest import load_tiny_reward
from reward.causal_text import encode_text_up_to_eot
from reward.tiny import make_tiny_rewards


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    settings = make_tiny_rewards(tmp_path_factory.mktemp("rewards"))
    return {"openai_clip": load_tiny_reward(settings, "clip").backbone.model, "hpsv2": load_tiny_reward(settings, "hpsv2").model}


@pytest.fixture
def real_prompts(shared_data) -> list[str]:
    """Real prompts of 11 to 100+ words (the longest is truncated at 77 tokens)."""
    prompts = pd.read_csv(shared_data / "images" / "sid_lsg" / "manifest.csv").prompt.drop_duplicates()
    return sorted(prompts, key=len)[:: max(1, len(prompts) // 6)]


@pytest.mark.parametrize("name", ["openai_clip", "hpsv2"])
def test_text_cut_after_the_last_eot_encodes_like_the_whole_context(text_models, real_prompts, name):
    model = text_models[name]
    for prompts in (real_prompts[:3], real_prompts, ["a cat"]):
        ids = tokenize(prompts)
        lengths = []
        hook = model.transformer.register_forward_pre_hook(lambda _, args, kwargs: lengths.append(args[0].shape[1]), with_kwargs=True)
        with torch.no_grad():
            cut = encode_text_up_to_eot(model, ids, normalize=True)
        hook.remove()
        assert lengths == [int(ids.argmax(-1).max()) + 1]
        with torch.no_grad():
            torch.testing.assert_close(cut, model.encode_text(ids, normalize=True), rtol=1e-5, atol=1e-6)


def test_models_not_pooled_at_the_eot_token_are_encoded_whole(text_models, monkeypatch):
    model = text_models["hpsv2"]
    monkeypatch.setattr(model, "text_pool_type", "last")
    ids = tokenize(["a cat"])
    calls = []
    monkeypatch.setattr(model, "encode_text", lambda text, normalize=False: calls.append(text.shape) or torch.zeros(1, 4))
    encode_text_up_to_eot(model, ids)
    assert calls == [ids.shape]  # open_clip's own encode_text, on all 77 positions
