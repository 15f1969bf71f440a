"""The CLIP and T5 tokenizers of FLUX, through the ``tokenizers`` library (no torch, no transformers).

Both give fixed-length int32 id arrays exactly as the references tokenize for FLUX (BFL's
``HFEmbedder`` and diffusers' ``FluxPipeline``: ``truncation=True, padding="max_length"``):

- CLIP (``tokenizer/``): NFC, whitespace runs -> one space, lowercase, CLIP's split regex, byte-level
  BPE with ``</w>`` word ends, ``<|startoftext|> ... <|endoftext|>``, truncated to 77 keeping both,
  padded with the pad token (``<|endoftext|>`` for OpenAI's CLIP).
- T5 (``tokenizer_2/``): the Unigram model of ``tokenizer.json``, ``... </s>``, truncated to an
  explicit ``max_length`` keeping ``</s>``, padded with ``<pad>`` (id 0). FLUX feeds T5 no attention
  mask, so the length changes the embeddings: 512 for dev, 256 for schnell in BFL's code.
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from permuquant_jax.convert.safetensors_io import CheckpointError, load_json

CLIP_MAX_LENGTH = 77
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
# CLIP's pre-tokenizer pattern (OpenAI's, as in the reference tokenizers): special tokens,
# English contractions, letter runs, single digits, runs of other non-space characters.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
T5_PAD = "<pad>"
T5_EOS = "</s>"


def default_clip_tokenizer_path() -> Path:
    """The CLIP BPE tokenizer files (vocab.json + merges.txt, OpenAI's vocabulary) shipped in the package."""
    return Path(str(importlib.resources.files("permuquant_jax") / "assets" / "clip_tokenizer"))


class TextTokenizer:
    """Prompts -> int32 ids ``[batch, max_length]``, truncated and padded like the reference.

    Wraps a ``tokenizers.Tokenizer`` whose post-processor adds the special tokens; truncation keeps
    them (the text is cut, not BOS/EOS).
    """

    def __init__(self, tokenizer: Tokenizer, *, max_length: int, pad_id: int, pad_token: str, name: str = ""):
        _check_max_length(max_length)
        self.max_length = max_length
        self.pad_id = int(pad_id)
        self.pad_token = pad_token
        self.name = name
        self._tokenizer = tokenizer
        tokenizer.no_truncation()
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length, strategy="longest_first", direction="right")
        tokenizer.enable_padding(direction="right", pad_id=self.pad_id, pad_token=pad_token, length=max_length)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (with added tokens): must not exceed the encoder's vocabulary."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (truncation and padding configured)."""
        return self._tokenizer

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Tokenize ``prompts`` (one string or a sequence) -> int32 ``[len(prompts), max_length]``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        bad = next((p for p in prompts if not isinstance(p, str)), None)
        if bad is not None:
            raise TypeError(f"TextTokenizer: prompts must be strings, got {type(bad).__name__} {bad!r}")
        if not prompts:
            return np.zeros((0, self.max_length), np.int32)
        encodings = self._tokenizer.encode_batch(prompts, add_special_tokens=True)
        return np.asarray([e.ids for e in encodings], dtype=np.int32)

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name or 'tokenizer'}, max_length={self.max_length}, pad_id={self.pad_id})"


def _check_max_length(max_length) -> None:
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ValueError(
            f"tokenizer max_length must be an integer >= 2 (room for the special tokens), got {max_length!r}"
        )


def _token_content(value) -> str | None:
    """A special token as transformers writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _configured_token(folder: Path, name: str) -> str | None:
    """``name`` (e.g. "pad_token") from special_tokens_map.json, else tokenizer_config.json."""
    for fname in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / fname
        if f.is_file():
            token = _token_content(load_json(f, "tokenizer JSON file").get(name))
            if token is not None:
                return token
    return None


def _from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception on bad files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable tokenizer.json ({first})") from None


def _token_id(tok: Tokenizer, token: str, where: Path, what: str) -> int:
    tid = tok.token_to_id(token)
    if tid is None:
        raise CheckpointError(f"{where}: the vocabulary has no {what} token '{token}'")
    return tid


def _added_tokens(folder: Path, defaults: Sequence[str]) -> list[AddedToken]:
    """Special tokens matched in the raw text, as transformers adds them: the folder's
    tokenizer_config.json ``added_tokens_decoder`` when present, else ``defaults`` (not normalized)."""
    config = folder / "tokenizer_config.json"
    entries = load_json(config, "tokenizer_config.json").get("added_tokens_decoder") if config.is_file() else None
    if not isinstance(entries, dict) or not entries:
        return [AddedToken(t, normalized=False, special=True) for t in defaults]
    out = []
    for _, e in sorted(entries.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
        if not isinstance(e, dict) or not isinstance(e.get("content"), str):
            raise CheckpointError(f"{config}: bad added_tokens_decoder entry {e!r}")
        out.append(
            AddedToken(
                e["content"],
                single_word=bool(e.get("single_word", False)),
                lstrip=bool(e.get("lstrip", False)),
                rstrip=bool(e.get("rstrip", False)),
                normalized=bool(e.get("normalized", False)),
                special=bool(e.get("special", True)),
            )
        )
    return out


def _build_clip_bpe(vocab_path: Path, merges_path: Path) -> Tokenizer:
    try:
        vocab, merges = BPE.read_file(str(vocab_path), str(merges_path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{vocab_path.parent}: cannot read vocab.json + merges.txt as a BPE tokenizer ({first})"
        ) from None
    for special in (CLIP_BOS, CLIP_EOS):
        if special not in vocab:
            raise CheckpointError(f"{vocab_path}: not a CLIP vocabulary: no '{special}' token")
    tok = Tokenizer(
        BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False, unk_token=CLIP_EOS)
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(
        (CLIP_EOS, vocab[CLIP_EOS]), (CLIP_BOS, vocab[CLIP_BOS]), trim_offsets=False, add_prefix_space=False
    )
    tok.add_special_tokens(_added_tokens(vocab_path.parent, (CLIP_BOS, CLIP_EOS)))
    return tok


def load_clip_tokenizer(path: str | os.PathLike | None = None, *, max_length: int = CLIP_MAX_LENGTH) -> TextTokenizer:
    """The CLIP tokenizer at ``path``: a folder with ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``
    (a diffusers ``tokenizer/`` folder, or the pipeline folder holding it), a ``tokenizer.json`` file, or
    None for the shipped vocabulary.

    Pads with the folder's ``pad_token`` (special_tokens_map.json / tokenizer_config.json), else
    ``<|endoftext|>`` (OpenAI's CLIP, FLUX).
    """
    _check_max_length(max_length)
    path = default_clip_tokenizer_path() if path is None else Path(path)
    if (path / "model_index.json").is_file() and (path / "tokenizer").is_dir():
        path = path / "tokenizer"  # a diffusers pipeline folder
    folder = path.parent if path.is_file() else path
    if path.is_file():
        tok = _from_file(path)
    elif path.is_dir():
        if (path / "tokenizer.json").is_file():
            tok = _from_file(path / "tokenizer.json")
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tok = _build_clip_bpe(path / "vocab.json", path / "merges.txt")
        else:
            raise CheckpointError(
                f"{path}: no CLIP tokenizer here: expected tokenizer.json or vocab.json + merges.txt "
                f"(a diffusers pipeline's tokenizer/ folder); found: [{_listing(path)}]"
            )
    else:
        raise CheckpointError(f"{path}: no such file or directory (expected a CLIP tokenizer folder)")
    where = path
    _token_id(tok, CLIP_BOS, where, "CLIP start")
    eos_id = _token_id(tok, CLIP_EOS, where, "CLIP end")
    pad_token = _configured_token(folder, "pad_token") or CLIP_EOS
    pad_id = eos_id if pad_token == CLIP_EOS else _token_id(tok, pad_token, where, "pad")
    return TextTokenizer(tok, max_length=max_length, pad_id=pad_id, pad_token=pad_token, name="clip")


def load_t5_tokenizer(path: str | os.PathLike, max_length: int) -> TextTokenizer:
    """The T5 tokenizer of ``tokenizer.json`` at ``path`` (a diffusers ``tokenizer_2/`` folder, the pipeline
    folder holding it, or the file), truncating and padding to ``max_length`` (512 for FLUX.1-dev, 256 for schnell)."""
    _check_max_length(max_length)
    path = Path(path)
    if (path / "model_index.json").is_file() and (path / "tokenizer_2").is_dir():
        path = path / "tokenizer_2"  # a diffusers pipeline folder
    if path.is_dir():
        file = path / "tokenizer.json"
        if not file.is_file():
            if (path / "spiece.model").is_file():
                raise CheckpointError(
                    f"{path}: has spiece.model but no tokenizer.json; permuquant-jax reads T5 tokenizers from "
                    f'tokenizer.json: write it once with python -c "from transformers import T5TokenizerFast as T; '
                    f"T.from_pretrained('{path}').save_pretrained('{path}')\""
                )
            raise CheckpointError(
                f"{path}: no tokenizer.json (the T5 tokenizer of a diffusers pipeline's tokenizer_2/ folder); "
                f"found: [{_listing(path)}]"
            )
    elif path.is_file():
        if path.name.endswith(".model"):
            raise CheckpointError(
                f"{path}: a sentencepiece model; pass the tokenizer.json beside it (make it with transformers' "
                f"T5TokenizerFast.from_pretrained(folder).save_pretrained(folder))"
            )
        file = path
    else:
        raise CheckpointError(f"{path}: no such file or directory (expected a T5 tokenizer folder or tokenizer.json)")
    tok = _from_file(file)
    pad_id = _token_id(tok, T5_PAD, file, "T5 pad")
    _token_id(tok, T5_EOS, file, "T5 end")
    if tok.post_processor is None:
        raise CheckpointError(f"{file}: no post_processor (a T5 tokenizer.json appends '</s>' through it)")
    return TextTokenizer(tok, max_length=max_length, pad_id=pad_id, pad_token=T5_PAD, name="t5")


def _listing(folder: Path, limit: int = 8) -> str:
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(found[:limit]) + (f", ... ({len(found)} entries)" if len(found) > limit else "")
