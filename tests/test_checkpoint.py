"""Checkpoint loading: the published key layout, our formats, LoRA merge, and clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURE, fixture_transformer, random_transformer
from safetensors.torch import load_file

from shotstream.checkpoint import WeightsError, load_transformer_weights, merge_lora
from shotstream.presets import WAN21_1_3B
from shotstream.transformer import ShotStreamTransformer


def published_layout(dim=1536, ffn=8960, layers=30, text_dim=4096, freq_dim=256) -> dict[str, tuple]:
    """Keys and shapes of `shotstream_merged.pt['generator']` as the reference describes them (§1, §6)."""
    shapes = {
        "patch_embedding.weight": (dim, 16, 1, 2, 2), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq_dim), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.head.weight": (64, dim), "head.head.bias": (64,), "head.modulation": (1, 2, dim),
    }  # fmt: skip
    for n in range(layers):
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"blocks.{n}.{attn}.{proj}.weight"] = (dim, dim)
                shapes[f"blocks.{n}.{attn}.{proj}.bias"] = (dim,)
            shapes[f"blocks.{n}.{attn}.norm_q.weight"] = (dim,)
            shapes[f"blocks.{n}.{attn}.norm_k.weight"] = (dim,)
        shapes[f"blocks.{n}.norm3.weight"] = shapes[f"blocks.{n}.norm3.bias"] = (dim,)
        shapes[f"blocks.{n}.ffn.0.weight"], shapes[f"blocks.{n}.ffn.0.bias"] = (ffn, dim), (ffn,)
        shapes[f"blocks.{n}.ffn.2.weight"], shapes[f"blocks.{n}.ffn.2.bias"] = (dim, ffn), (dim,)
        shapes[f"blocks.{n}.modulation"] = (1, 6, dim)
    return {f"model.{k}": v for k, v in shapes.items()}


def test_published_layout_loads_strictly_into_wan_preset(tmp_path, monkeypatch):
    layout = published_layout()
    assert len(layout) == 825
    with torch.device("meta"):
        model = ShotStreamTransformer.from_preset(WAN21_1_3B.transformer)
    state = {"generator": {k: torch.empty(shape, device="meta") for k, shape in layout.items()}}
    monkeypatch.setattr("shotstream.checkpoint.read_state_dict", lambda path: state)
    original = model.load_state_dict
    monkeypatch.setattr(model, "load_state_dict", lambda sd, strict: original(sd, strict=strict, assign=True))
    load_transformer_weights(model, tmp_path / "shotstream_merged.pt")  # strict: raises on any mismatch
    assert model.blocks[29].attn2.to_out[0].weight.shape == (1536, 1536)


def test_published_pt_wrapper_and_safetensors_load_the_same(tmp_path):
    weights = load_file(str(FIXTURE / "weights.safetensors"))
    torch.save({"generator": weights, "step": 7}, tmp_path / "shotstream_merged.pt")
    reference = fixture_transformer().state_dict()
    model = fixture_transformer()
    load_transformer_weights(model, tmp_path / "shotstream_merged.pt")
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_missing_and_corrupt_weights_name_the_file(tmp_path):
    model = random_transformer()
    with pytest.raises(WeightsError, match="not found.*nothere.pt.*KlingTeam/ShotStream"):
        load_transformer_weights(model, tmp_path / "nothere.pt")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes((FIXTURE / "weights.safetensors").read_bytes()[:5000])
    with pytest.raises(WeightsError, match="corrupt.safetensors.*download it again"):
        load_transformer_weights(model, corrupt)
    with pytest.raises(WeightsError, match="does not fit"):
        load_transformer_weights(model, FIXTURE / "weights.safetensors")  # the fixture is a bigger model


@pytest.mark.parametrize("names", ["original", "diffusers"])
def test_lora_merge_adds_b_times_a(names):
    model = random_transformer()
    before = model.blocks[1].attn1.to_q.weight.clone()
    a, b = torch.randn(4, 24), torch.randn(24, 4)
    module = "blocks.1.self_attn.q" if names == "original" else "transformer.blocks.1.attn1.to_q"
    merged = merge_lora(model, {f"{module}.lora_A.weight": a, f"{module}.lora_B.weight": b})
    assert merged == 1
    torch.testing.assert_close(model.blocks[1].attn1.to_q.weight, before + b @ a)
    with pytest.raises(WeightsError, match="matches no linear layer"):
        merge_lora(model, {"blocks.9.self_attn.q.lora_A.weight": a, "blocks.9.self_attn.q.lora_B.weight": b})
