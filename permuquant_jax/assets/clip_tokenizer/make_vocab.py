"""Write ``vocab.json`` + ``merges.txt`` (the CLIP BPE tokenizer files) from OpenAI's BPE table.

    python permuquant_jax/assets/clip_tokenizer/make_vocab.py bpe_simple_vocab_16e6.txt.gz [OUT_DIR]

The input is OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (MIT; it ships in the ``open_clip_torch``
wheel: ``pip download --no-deps open_clip_torch``). CLIP uses its first 48894 merges; its vocabulary
is, in id order: the 256 byte symbols (GPT-2's printable stand-ins for bytes), the same 256 with the
end-of-word marker ``</w>``, one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>``
(49408 tokens). These are the files Hugging Face's ``openai/clip-vit-*`` tokenizers ship.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

N_MERGES = 49152 - 256 - 2
SPECIAL = ("<|startoftext|>", "<|endoftext|>")
END_OF_WORD = "</w>"


def byte_symbols() -> list[str]:
    """The 256 unicode stand-ins of the bytes 0..255, in GPT-2 / CLIP vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    order, chars = list(printable), list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            order.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def build(bpe_lines: list[str]) -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merge lines ``"a b"``) from the lines of the BPE table (header first)."""
    merges = bpe_lines[1 : 1 + N_MERGES]
    if len(merges) != N_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(f"expected {N_MERGES} merge lines 'a b' after the header, got {len(merges)}")
    symbols = byte_symbols()
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [m.replace(" ", "") for m in merges] + list(SPECIAL)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("duplicate tokens in the vocabulary")
    return vocab, merges


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    src = Path(argv[0])
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).parent
    lines = gzip.decompress(src.read_bytes()).decode("utf-8").split("\n")
    vocab, merges = build(lines)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {out}/vocab.json ({len(vocab)} tokens) and merges.txt ({len(merges)} merges)")


if __name__ == "__main__":
    main(sys.argv[1:])
