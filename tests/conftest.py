"""Shared test helpers: the official-tiny reference fixture and small random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shotstream.checkpoint import load_transformer_weights
from shotstream.transformer import ShotStreamTransformer

FIXTURE = Path(__file__).parent / "fixtures" / "official-tiny"


def fixture_transformer() -> ShotStreamTransformer:
    """The reference fixture's tiny architecture (README §1) with its published-format weights."""
    config = json.loads((FIXTURE / "config.json").read_text())["model"]
    model = ShotStreamTransformer(
        num_attention_heads=config["num_heads"],
        attention_head_dim=config["head_dim"],
        num_layers=config["num_layers"],
        ffn_dim=config["ffn_dim"],
        text_dim=config["text_dim"],
        freq_dim=config["freq_dim"],
    )
    load_transformer_weights(model, FIXTURE / "weights.safetensors")
    return model.eval()


def random_transformer(seed: int = 0, num_layers: int = 2, dtype=torch.float32) -> ShotStreamTransformer:
    """A tiny random transformer whose weights are large enough that attention is not flat."""
    torch.manual_seed(seed)
    model = ShotStreamTransformer(
        num_attention_heads=2, attention_head_dim=12, num_layers=num_layers, ffn_dim=32, text_dim=16
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm_q" in name or "norm_k" in name:
                p.fill_(2.0)
            elif p.ndim > 1 or "scale_shift" in name:
                p.normal_(0, 0.15)
            else:
                p.normal_(0, 0.05)
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def trace():
    """Every generator call of the reference's 5-shot rollout (fixture README §5)."""
    return load_file(str(FIXTURE / "student_trace.safetensors"))


def wrapper_to_diffusers(x: torch.Tensor) -> torch.Tensor:
    """Reference wrapper layout `(B, F, C, H, W)` -> diffusers `(B, C, F, H, W)`."""
    return x.permute(0, 2, 1, 3, 4)
