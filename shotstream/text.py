"""Captions and the UMT5 text encoder (reference `wan/modules/tokenizers.py`, `utils/wan_wrapper.py`).

Shot i (0-based) is described by `global_caption + "shot{i}:" + shot_caption_{i+1}`; the model generating
shot k is given the captions of shots 0..k, one embedding per caption. Captions are cleaned like Wan
(`clean='whitespace'`), tokenized to exactly `max_length` tokens and encoded by UMT5; positions at or past the
true length are set to 0.0 (zero padding, never masked later), as in Wan and diffusers' `WanPipeline`.

The real preset loads google/umt5-xxl from the diffusers layout of Wan2.1 (`tokenizer/`, `text_encoder/`).
The tiny preset uses a word-level tokenizer built offline and a fresh tiny UMT5, through the same code path.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

import ftfy
import torch
from safetensors import SafetensorError
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

from .presets import TextEncoderConfig

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 like T5
DOWNLOAD_HINT = (
    'get the files with `hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --include "tokenizer/*" '
    '--include "text_encoder/*" --local-dir <folder>` and pass <folder>'
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def clean_text(text: str) -> str:
    """Wan's `clean='whitespace'`: fix mojibake, unescape HTML twice, collapse whitespace runs to a space."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def shot_caption(global_caption: str, shot_prompt: str, index: int) -> str:
    """The caption of shot `index` (0-based): plain concatenation, no space, e.g. `"G.shot0:S1"`."""
    return f"{global_caption}shot{index}:{shot_prompt}"


def story_captions(global_caption: str, shot_prompts: list[str]) -> list[str]:
    """Captions of shots 0..len(shot_prompts)-1; the model for shot k gets the first k+1 of them."""
    return [shot_caption(global_caption, prompt, i) for i, prompt in enumerate(shot_prompts)]


def build_word_tokenizer(vocabulary: list[str], max_length: int) -> PreTrainedTokenizerFast:
    """A T5-like word-level tokenizer for the tiny model: lower-cased words and single punctuation characters.

    Ids: `<pad>` 0, `</s>` 1, `<unk>` 2, then `vocabulary` (lower-cased, first occurrence wins).
    `</s>` is appended to every sequence, like UMT5. Save it with `save_pretrained` and load it back with
    `AutoTokenizer.from_pretrained(folder)`, exactly like the real UMT5 tokenizer.
    """
    words = [w for w in dict.fromkeys(w.lower() for w in vocabulary) if w not in SPECIAL_TOKENS]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="isolated")]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def build_text_encoder(config: TextEncoderConfig, vocab_size: int | None = None) -> UMT5EncoderModel:
    """A freshly initialised UMT5 encoder of the given size (vocab_size defaults to `config.vocab_size`)."""
    umt5_config = UMT5Config(
        vocab_size=vocab_size or config.vocab_size,
        d_model=config.d_model,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        d_kv=config.d_kv,
        d_ff=config.d_ff,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",  # gelu_new = GELU(tanh), like Wan's umt5_xxl
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return UMT5EncoderModel(umt5_config)


def _clean_batch(captions: str | list[str]) -> list[str]:
    return [clean_text(c) for c in ([captions] if isinstance(captions, str) else captions)]


def _load(loader, source: str, subfolder: str, local_files_only: bool, **kwargs):
    """`loader.from_pretrained` on `source/subfolder` (a local folder) or on a Hub repo id; clear errors."""
    if Path(source).is_dir():
        name = where = str(Path(source) / subfolder)
        if not Path(name).is_dir():
            raise FileNotFoundError(f"missing folder {name}; {DOWNLOAD_HINT}")
        args = {"local_files_only": True}
    else:
        name, where = source, f"the Hub repo {source} (subfolder {subfolder!r})"
        args = {"subfolder": subfolder, "local_files_only": local_files_only}
    try:
        return loader.from_pretrained(name, **args, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        raise OSError(f"could not load {subfolder} from {where}: {err}\n{DOWNLOAD_HINT}") from err


class TextEncoder(torch.nn.Module):
    """Tokenizer + UMT5 encoder: a list of N captions -> (N, max_length, d_model) zero-padded embeddings.

    Device and dtype are those of the module (`.to(...)` it). Gradients are left to the caller: wrap
    inference in `torch.no_grad()`, fine-tuning can backpropagate through `forward`.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, text_encoder: UMT5EncoderModel, max_length: int) -> None:
        super().__init__()
        if len(tokenizer) > text_encoder.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the encoder only {text_encoder.config.vocab_size}"
            )
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder.dtype

    def tokenize(self, captions: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned captions -> (input_ids, attention_mask), both (N, max_length) int64 on CPU.

        Captions longer than `max_length` tokens are truncated (keeping the final `</s>`), as in the
        reference. Since the global caption comes first, it is the tail of the *shot* caption that is cut:
        check `count_tokens` to warn the user.
        """
        tokens = self.tokenizer(
            _clean_batch(captions),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return tokens.input_ids, tokens.attention_mask

    def count_tokens(self, captions: str | list[str]) -> list[int]:
        """Untruncated token count of each cleaned caption, `</s>` included (> max_length means cut)."""
        tokens = self.tokenizer(_clean_batch(captions), add_special_tokens=True, verbose=False)
        return [len(ids) for ids in tokens.input_ids]

    def forward(self, captions: str | list[str]) -> torch.Tensor:
        """captions (N strings) -> (N, max_length, d_model); rows at or past each caption's length are 0.0."""
        if not captions:
            raise ValueError("at least one caption is needed")
        input_ids, attention_mask = self.tokenize(captions)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        lengths = attention_mask.sum(dim=1)  # (N,)
        padding = torch.arange(self.max_length, device=self.device)[None] >= lengths[:, None]  # (N, L)
        return hidden.masked_fill(padding[..., None], 0.0)

    @classmethod
    def from_pretrained(
        cls,
        folder_or_repo: str | os.PathLike,
        max_length: int = 512,
        subfolders: tuple[str, str] = ("tokenizer", "text_encoder"),
        local_files_only: bool = False,
        dtype: torch.dtype | None = None,
    ) -> TextEncoder:
        """Load the diffusers layout (`tokenizer/`, `text_encoder/`) from a local folder or a Hub repo id.

        A local folder is used when it exists; anything else must look like `owner/name` and is read through
        the Hub cache (`local_files_only` is passed on). `dtype=None` keeps the checkpoint's dtype
        (transformers 5 default).
        """
        source = os.fspath(folder_or_repo)
        if not Path(source).is_dir() and not _REPO_ID.match(source):
            raise FileNotFoundError(f"no such folder {source}; {DOWNLOAD_HINT}")
        tokenizer = _load(AutoTokenizer, source, subfolders[0], local_files_only)
        text_encoder = _load(UMT5EncoderModel, source, subfolders[1], local_files_only, dtype=dtype)
        return cls(tokenizer, text_encoder, max_length)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `folder/tokenizer/` and `folder/text_encoder/` (the layout `from_pretrained` reads)."""
        self.tokenizer.save_pretrained(Path(folder) / "tokenizer")
        self.text_encoder.save_pretrained(Path(folder) / "text_encoder")
