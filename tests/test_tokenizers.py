"""Tokenizers: ids identical to transformers' CLIPTokenizer / T5Tokenizer(Fast) on many prompts.

CLIP runs on the vocabulary shipped in the package (OpenAI's BPE table). T5 runs on a small
sentencepiece Unigram model trained here, converted to tokenizer.json by transformers' converter.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from permuquant_jax.convert import CheckpointError
from permuquant_jax.generate.tokenizers import (
    CLIP_MAX_LENGTH,
    TextTokenizer,
    default_clip_tokenizer_path,
    load_clip_tokenizer,
    load_t5_tokenizer,
)

BASE_PROMPTS = [
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "An astronaut riding a horse on Mars, photorealistic, 8k",
    "  leading and trailing spaces   ",
    "multiple     spaces\tand\ttabs\nand\nnewlines\r\nwindows",
    "",
    " ",
    "punctuation!!! ??? ... ,,, ;;; ::: --- ___ +++ === ***",
    "(parentheses) [brackets] {braces} <angles> |pipes|",
    "quotes: 'single' \"double\" `back` «guillemets» „low“ ‘curly’ “curly”",
    "it's, don't, I'm, we'll, they've, you're, he'd, IT'S, DON'T",
    "numbers 0 1 2 3 12345 3.14159 1,000,000 2nd 3rd 4th 1990s",
    "email@example.com https://example.org/path?q=1&x=2#frag",
    "#hashtag @mention $100 50% ^caret ~tilde \\backslash /slash",
    "naïve café résumé coöperate façade jalapeño Ångström",
    "e\u0301 composed vs é precomposed (NFC)",
    "Straße Großbuchstaben ÄÖÜ äöü",
    "ﬁ ligature ﬂ and fullwidth ＡＢＣ１２３",
    "日本語のテキスト、東京の夜景",
    "中文提示词：一只猫在月光下",
    "한국어 프롬프트 고양이",
    "Русский текст: кошка на крыше",
    "Ελληνικά: γάτα στη στέγη",
    "العربية: قطة على السطح",
    "עברית: חתול על הגג",
    "हिन्दी: छत पर बिल्ली",
    "ภาษาไทย แมวบนหลังคา",
    "emoji 🐱🚀🔥 and flags 🇫🇷🇯🇵 and zwj 👩‍🚀",
    "math ∑ ∫ √ ∞ ≈ ≠ ≤ ≥ ± × ÷ π",
    "arrows → ← ↑ ↓ ⇒ and boxes ■ □ ▲",
    "currency € £ ¥ ₹ ₩ ₿",
    "a\u00a0non-breaking\u00a0space and a\u2009thin space and\u3000ideographic",
    "zero\u200bwidth\u200bspace and soft\u00adhyphen",
    "control chars \x01\x02\x7f in text",
    "<|startoftext|> literal special tokens <|endoftext|> in the prompt",
    "</s> <pad> <unk> look like T5 specials",
    "CamelCaseWordsAndSnake_case_words and kebab-case-words",
    "repeated repeated repeated repeated repeated",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a cinematic shot of a lighthouse at dusk, volumetric fog, octane render, trending on artstation",
    "portrait of an old fisherman, dramatic lighting, 85mm f/1.4, bokeh",
    "a watercolor painting of a fox in a snowy forest",
    "isometric pixel art of a tiny cozy cabin, 16-bit, vibrant colors",
    "macro photograph of a dew drop on a spider web at sunrise",
    'sign that says "OPEN 24/7" in neon letters',
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!",
    "line1\n\n\nline4",
    "ends with newline\n",
    "x" * 300,
    " ".join(["word"] * 120),
    "very long prompt " + ", ".join(f"detail number {i} with extra words" for i in range(60)),
    " ".join(["🐱"] * 90),
    "mixed 123abc456def 7g8h9i",
    "k-pop, r&b, rock'n'roll, hip-hop",
    "tokens like don't've and y'all'd've",
]


def _random_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'\"-é日🐱\t\n"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))) for _ in range(n)]


PROMPTS = BASE_PROMPTS + _random_prompts(20, seed=random.SystemRandom().randint(0, 2**31))


# ---------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def clip_tok():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def clip_reference():
    transformers = pytest.importorskip("transformers")
    folder = default_clip_tokenizer_path()
    return transformers.CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))


def _reference_ids(tok, prompts, max_length):
    out = tok(prompts, truncation=True, max_length=max_length, padding="max_length")
    return np.asarray(out["input_ids"], np.int64)


def test_clip_shipped_vocabulary_is_openai_clip(clip_tok):
    tok = clip_tok
    vocab = json.loads((default_clip_tokenizer_path() / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    # Ids of OpenAI's CLIP (its README example), independent of our conversion of the table.
    ids = tok(["a photo of a cat"])[0]
    np.testing.assert_array_equal(ids[:7], [49406, 320, 1125, 539, 320, 2368, 49407])
    assert (ids[7:] == 49407).all()
    assert (default_clip_tokenizer_path() / "LICENSE").is_file()


def test_clip_ids_match_transformers(clip_tok, clip_reference):
    tok = clip_tok
    assert tok.max_length == CLIP_MAX_LENGTH and tok.pad_id == 49407 and tok.vocab_size == 49408
    ours = tok(PROMPTS)
    assert ours.dtype == np.int32 and ours.shape == (len(PROMPTS), 77)
    ref = _reference_ids(clip_reference, PROMPTS, 77)
    for prompt, a, b in zip(PROMPTS, ours, ref, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=repr(prompt))
    # Over-long prompts were cut, keeping BOS and EOS.
    long = ours[PROMPTS.index(" ".join(["word"] * 120))]
    assert long[0] == 49406 and long[-1] == 49407 and (long[1:-1] != 49407).all()


def test_clip_from_tokenizer_json_and_pad_token(tmp_path, clip_reference):
    # A tokenizer.json as transformers writes it, and a folder whose special_tokens_map pads with "!".
    clip_reference.save_pretrained(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    tok = load_clip_tokenizer(tmp_path)
    assert tok.pad_id == 0
    ours = tok(PROMPTS[:30])
    ref = clip_reference(PROMPTS[:30], truncation=True, max_length=77, padding="max_length", pad_to_multiple_of=None)
    ref_ids = np.asarray(ref["input_ids"])
    mask = np.asarray(ref["attention_mask"]).astype(bool)
    np.testing.assert_array_equal(np.where(mask, ours, -1), np.where(mask, ref_ids, -1))
    assert (ours[~mask] == 0).all()
    # The file itself (the folder's pad token still applies).
    np.testing.assert_array_equal(load_clip_tokenizer(tmp_path / "tokenizer.json")(PROMPTS[:30]), ours)


def test_clip_flux_style_folder_matches_from_pretrained(tmp_path):
    # A diffusers tokenizer/ folder as FLUX ships it: vocab.json + merges.txt + the two JSON files, whose
    # special tokens are "normalized" (matched after lowercasing, so "<|STARTOFTEXT|>" is one too).
    transformers = pytest.importorskip("transformers")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((default_clip_tokenizer_path() / name).read_bytes())
    special = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False, "special": True}
    config = {
        "added_tokens_decoder": {
            "49406": {"content": "<|startoftext|>", **special},
            "49407": {"content": "<|endoftext|>", **special},
        },
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    prompts = PROMPTS + ["<|STARTOFTEXT|> upper <|EndOfText|> case", "a<|endoftext|>b"]
    ref = _reference_ids(transformers.CLIPTokenizer.from_pretrained(str(tmp_path)), prompts, 77)
    ours = load_clip_tokenizer(tmp_path)(prompts)
    pipeline = tmp_path.parent / (tmp_path.name + "_pipeline")
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    tmp_path.rename(pipeline / "tokenizer")  # the same files as a pipeline's tokenizer/
    np.testing.assert_array_equal(load_clip_tokenizer(pipeline)(prompts), ours)
    for prompt, a, b in zip(prompts, ours, ref, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=repr(prompt))
    assert (ours[-2, :4] == [49406, 49406, 7067, 49407]).all()


# ---------------------------------------------------------------- T5


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A small Unigram sentencepiece model in T5's id layout, converted to tokenizer.json."""
    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("t5tok")
    rng = random.Random(0)
    words = (
        "the a of photo cat dog house tree sky blue red green light dark portrait painting city night river "
        "mountain forest snow sun moon star old young man woman child bird fish car road bridge water fire "
        "café naïve Straße 日本 東京 猫 кошка γάτα emoji ! ? , . ' \" - ( ) 0 1 2 3 4 5 6 7 8 9"
    ).split()
    syllables = ["ka", "ro", "mi", "te", "su", "lan", "dor", "phi", "qu", "ex", "str", "ing", "tion", "ly", "ed"]
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    corpus = root / "corpus.txt"
    corpus.write_text(
        "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 20))) for _ in range(2000)),
        encoding="utf-8",
    )
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(root / "spiece"),
        vocab_size=300,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
        num_threads=1,
        hard_vocab_limit=False,
    )
    spm_dir = root / "spm_only"
    spm_dir.mkdir()
    (spm_dir / "spiece.model").write_bytes((root / "spiece.model").read_bytes())
    ref = transformers.T5TokenizerFast.from_pretrained(str(spm_dir))  # converts spiece.model
    fast_dir = root / "tokenizer_2"
    ref.save_pretrained(str(fast_dir))
    assert (fast_dir / "tokenizer.json").is_file()
    return spm_dir, fast_dir, ref


@pytest.mark.parametrize("max_length", [16, 77])
def test_t5_ids_match_transformers(t5_folder, max_length):
    spm_dir, fast_dir, ref = t5_folder
    tok = load_t5_tokenizer(fast_dir, max_length=max_length)
    if max_length == 16:  # the pipeline folder holding tokenizer_2/ gives the same tokenizer
        (fast_dir.parent / "model_index.json").write_text("{}")
        np.testing.assert_array_equal(load_t5_tokenizer(fast_dir.parent, 16)(PROMPTS), tok(PROMPTS))
    assert tok.pad_id == 0 and tok.max_length == max_length and tok.vocab_size == len(ref)
    ours = tok(PROMPTS)
    assert ours.dtype == np.int32 and ours.shape == (len(PROMPTS), max_length)
    for reference in (ref, type(ref).from_pretrained(str(fast_dir))):
        expected = _reference_ids(reference, PROMPTS, max_length)
        for prompt, a, b in zip(PROMPTS, ours, expected, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=repr(prompt))
    # Every row ends in </s> (1) then <pad> (0), over-long ones cut to max_length keeping </s>.
    last = max_length - 1 - np.argmax(ours[:, ::-1] != 0, axis=1)
    assert (ours[np.arange(len(PROMPTS)), last] == 1).all() and (last == max_length - 1).any()


def test_t5_matches_sentencepiece_on_plain_text(t5_folder):
    # An independent reference: sentencepiece itself (+ </s>) on text without whitespace edge cases.
    spm = pytest.importorskip("sentencepiece")
    spm_dir, fast_dir, _ = t5_folder
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "spiece.model"))
    tok = load_t5_tokenizer(fast_dir / "tokenizer.json", max_length=64)
    # (sentencepiece reads "</s>" in the text as characters, transformers as the special token.)
    plain = [p for p in BASE_PROMPTS if p.strip() and " ".join(p.split()) == p and len(p) < 60 and "<" not in p]
    assert len(plain) > 20
    for prompt, ids in zip(plain, tok(plain), strict=True):
        expected = sp.encode(prompt) + [1]
        np.testing.assert_array_equal(ids[: len(expected)], expected, err_msg=repr(prompt))
        assert (ids[len(expected) :] == 0).all()


def test_t5_folder_with_only_spiece_model_names_the_fix(t5_folder):
    spm_dir, _, _ = t5_folder
    with pytest.raises(CheckpointError) as e:
        load_t5_tokenizer(spm_dir, max_length=512)
    msg = str(e.value)
    assert "\n" not in msg and "spiece.model" in msg and "tokenizer.json" in msg and "save_pretrained" in msg
    with pytest.raises(CheckpointError, match="sentencepiece model"):
        load_t5_tokenizer(spm_dir / "spiece.model", max_length=512)


# ---------------------------------------------------------------- errors


def test_bad_tokenizer_inputs_give_one_line_errors(tmp_path, clip_tok):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "vocab_only").mkdir()
    (tmp_path / "vocab_only" / "vocab.json").write_text("{}")
    cases = [
        (lambda: load_clip_tokenizer(tmp_path / "missing"), "no such file"),
        (lambda: load_clip_tokenizer(tmp_path / "empty"), "vocab.json + merges.txt"),
        (lambda: load_clip_tokenizer(tmp_path / "vocab_only"), "vocab.json + merges.txt"),
        (lambda: load_clip_tokenizer(tmp_path / "bad.json"), "not a readable tokenizer.json"),
        (lambda: load_t5_tokenizer(tmp_path / "empty", 512), "no tokenizer.json"),
        (lambda: load_t5_tokenizer(tmp_path / "missing", 512), "no such file"),
    ]
    for fn, fragment in cases:
        with pytest.raises(CheckpointError) as e:
            fn()
        assert fragment in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="max_length"):
        load_clip_tokenizer(max_length=1)
    with pytest.raises(TypeError, match="strings"):
        clip_tok(["ok", 3])


def test_text_tokenizer_accepts_a_single_string(clip_tok):
    tok = clip_tok
    assert isinstance(tok, TextTokenizer)
    np.testing.assert_array_equal(tok("a photo of a cat"), tok(["a photo of a cat"]))
    assert tok([]).shape == (0, 77)
