"""Loading ShotStream weights: the published checkpoint, our own safetensors, and stage-2 LoRA.

Formats understood (reference §6):
  * the published `shotstream_merged.pt` (also teacher / ODE-init checkpoints): a `torch.save` dict
    `{"generator": state_dict}` whose keys are `model.` + original Wan names (`model.blocks.0.self_attn.q.weight`);
    read with `torch.load(weights_only=True)`, the prefix stripped, names converted to diffusers';
  * a bare original-Wan or diffusers-named state dict in `.pt` / `.pth` / `.safetensors`;
  * LoRA deltas (`lora_A` / `lora_B` per linear, peft naming, original or diffusers module names), merged
    into the base weights as `W + scale * B A` (reference `merge_lora_checkpoint.py`, scale = alpha / rank = 1).
Every failure names the file and says how to get a good one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file

HOW_TO_GET_WEIGHTS = (
    "The published student is `shotstream_merged.pt` in the Hugging Face repo KlingTeam/ShotStream "
    "(`huggingface-cli download KlingTeam/ShotStream shotstream_merged.pt --local-dir ckpts`); the tiny "
    "toy-world model ships with this repository and is rebuilt by `python -m train.recipe`."
)


class WeightsError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors`, `.pt` or `.pth` file (CPU), with a clear error when it fails."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}. {HOW_TO_GET_WEIGHTS}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors, zip and unpickling errors all mean the same to a user
        raise WeightsError(
            f"cannot read weights file {path} ({type(error).__name__}: {error}); it is probably truncated "
            f"or corrupt: download it again. {HOW_TO_GET_WEIGHTS}"
        ) from error


def unwrap_generator(state: dict, path: str | Path = "<state>") -> dict[str, torch.Tensor]:
    """The generator's state dict with the wrapper's `model.` prefix removed."""
    for key in ("generator", "generator_ema"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path} holds no tensors (keys: {sorted(state)[:5]}). {HOW_TO_GET_WEIGHTS}")
    return {k.removeprefix("model."): v for k, v in tensors.items()}


def to_diffusers_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert original Wan parameter names to diffusers' (no-op for diffusers-named dicts)."""
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in state):
        return dict(state)
    return convert_wan_transformer_to_diffusers(dict(state))


def load_transformer_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a ShotStream / Wan checkpoint strictly into `model` (a `ShotStreamTransformer`)."""
    state = to_diffusers_names(unwrap_generator(read_state_dict(path), path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise WeightsError(
            f"{path} does not fit the `{model.config.num_layers}`-layer, dim "
            f"{model.config.num_attention_heads * model.config.attention_head_dim} transformer of this preset "
            f"(wrong preset or wrong file?): {str(error)[:600]}"
        ) from error


def merge_lora(model: torch.nn.Module, lora: dict[str, torch.Tensor], scale: float = 1.0) -> int:
    """Merge LoRA deltas into `model`'s linear weights in place; returns the number of merged layers.

    Keys look like `<module>.lora_A[.default].weight` / `<module>.lora_B[...].weight`, with optional
    `base_model.model.` / `transformer.` / `model.` prefixes and original or diffusers module names.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora.items():
        for kind in ("lora_A", "lora_B"):
            if f".{kind}." in key:
                module = key.split(f".{kind}.")[0]
                for prefix in ("base_model.model.", "transformer.", "model."):
                    module = module.removeprefix(prefix)
                pairs.setdefault(module, {})[kind] = tensor
    modules = dict(model.named_modules())
    for original, ab in pairs.items():
        (converted,) = to_diffusers_names({f"{original}.weight": torch.empty(0)})
        target = modules.get(converted.removesuffix(".weight"))
        if not isinstance(target, torch.nn.Linear) or set(ab) != {"lora_A", "lora_B"}:
            raise WeightsError(f"LoRA entry {original!r} matches no linear layer of the model")
        delta = ab["lora_B"].float() @ ab["lora_A"].float()  # (out, rank) @ (rank, in)
        target.weight.data += (scale * delta).to(target.weight.dtype)
    return len(pairs)
