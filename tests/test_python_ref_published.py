"""python_ref against the published systems: every published-variant claim has its published
dimensions at base (meta device, no memory), and the HF-built systems give the logits of the HF
class they claim to be, so python_ref cannot drift from what ``patch()`` accelerates on real
checkpoints."""

import pytest
import torch

import python_ref


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _base(name, **overrides):
    with torch.device("meta"):
        return python_ref.build(name, "base", **overrides)


# ---------------------------------------------------------------- published dims at base

def test_onevision_base_matches_hf_checkpoint():
    # llava-hf/llava-onevision-qwen2-7b-ov-hf config.json: SigLIP-so400m minus its last layer, read at -1
    cfg = _base("llava_onevision").config
    v = cfg.vision_config
    assert (v.num_hidden_layers, v.hidden_size, v.intermediate_size, v.num_attention_heads) == (26, 1152, 4304, 16)
    assert (v.image_size, v.patch_size, v.vision_use_head) == (384, 14, False)
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-1, "full")
    assert cfg.vision_aspect_ratio == "anyres_max_9"
    t = cfg.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_key_value_heads, t.vocab_size) == (3584, 28, 4, 152128)
    assert (cfg.image_token_id, cfg.video_token_id) == (151646, 151647)
