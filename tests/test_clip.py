"""CLIP text transformer: fp32 parity with transformers' CLIPTextModel through our loaders, both
pooled-output rules, ComfyUI-style files with and without the ``text_model.`` prefix, errors."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from permuquant_jax.convert import CheckpointError
from permuquant_jax.convert.encoders import CLIP_CONFIG_METADATA_KEY, clip_keymap, load_clip, read_clip_config
from permuquant_jax.models.clip import CLIPTextConfig, CLIPTextModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, EOS_NEW = 1000, 997
TINY = dict(vocab_size=VOCAB, hidden=128, heads=2, layers=2, intermediate=256, max_position=77)


def _hf_config(eos_token_id: int):
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        num_attention_heads=2,
        num_hidden_layers=2,
        intermediate_size=256,
        max_position_embeddings=77,
        eos_token_id=eos_token_id,
        bos_token_id=0,
        pad_token_id=1,
        hidden_act="quick_gelu",
    )


def _reference_model(seed: int, eos_token_id: int):
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(_hf_config(eos_token_id)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embedding" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def _ids(rng, eos: int) -> np.ndarray:
    """Prompts as a tokenizer pads them: BOS, text, EOS, then EOS padding. The largest id of each row is
    placed before its EOS, so the two pooled rules pick different positions."""
    ids = rng.integers(3, VOCAB - 3, size=(3, 77))
    for row, n in zip(ids, (5, 40, 75), strict=True):
        row[0] = 0
        row[n - 2] = VOCAB - 1
        row[n:] = eos
    return ids.astype(np.int32)


def _reference(model, ids, state=None):
    if state is not None:
        model.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()}, strict=False)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


@nnx.jit
def _encode(model, ids):
    return model(ids)


def _rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    seed = int(np.random.default_rng().integers(2**31))
    rng = np.random.default_rng(seed)
    legacy = _reference_model(seed, eos_token_id=2)
    new = _reference_model(seed + 1, eos_token_id=EOS_NEW)
    return dict(
        legacy=legacy,
        new=new,
        ids_legacy=_ids(rng, VOCAB - 1),  # legacy rule: EOS is the largest id (as CLIP's 49407)
        ids_new=_ids(rng, EOS_NEW),
        root=tmp_path_factory.mktemp("clip"),
        seed=seed,
    )


def _check(model, ref_model, ids, seed, state=None):
    hidden, pooled = _encode(model, jnp.asarray(ids))
    ref_hidden, ref_pooled = _reference(ref_model, ids, state)
    assert hidden.shape == ref_hidden.shape and pooled.shape == ref_pooled.shape
    errs = _rel_err(hidden, ref_hidden), _rel_err(pooled, ref_pooled)
    assert max(errs) <= 1e-5, (errs, seed)
    return np.asarray(pooled)


@pytest.mark.parametrize("rule", ["legacy", "new"])
def test_clip_folder_fp32_parity_both_pooled_rules(clip, rule):
    folder = clip["root"] / f"pipeline_{rule}"
    clip[rule].save_pretrained(folder / "text_encoder")
    cfg = read_clip_config(folder)
    assert cfg.eos_token_id == (2 if rule == "legacy" else EOS_NEW) and cfg.heads == 2
    model = load_clip(folder, dtype=jnp.float32)
    ids = clip[f"ids_{rule}"]
    pooled = _check(model, clip[rule], ids, clip["seed"])
    # The rules really differ on these ids: the pooled rows are the hidden states at different positions.
    hidden, _ = _encode(model, jnp.asarray(ids))
    other = np.argmax(ids, -1) if rule == "new" else np.argmax(ids == 2, -1)
    assert not np.allclose(pooled, np.asarray(hidden)[np.arange(3), other])


@pytest.mark.parametrize("prefix", ["text_model.", ""])
def test_clip_single_file_fp16_parity(clip, prefix):
    state = {k: v.detach().numpy() for k, v in clip["legacy"].state_dict().items()}
    tensors = {prefix + _unprefixed(k): v.astype(np.float16) for k, v in state.items()}
    tensors["text_projection.weight"] = np.zeros((8, 128), np.float16)  # CLIPTextModelWithProjection's head
    path = clip["root"] / f"clip_l_{prefix or 'noprefix'}.safetensors"
    save_file(tensors, str(path))
    cfg = read_clip_config(path)  # inferred: heads from head width 64, the legacy pooled rule
    assert cfg == CLIPTextConfig(**TINY)
    rounded = {k: v.astype(np.float16) for k, v in state.items()}
    _check(load_clip(path, dtype=jnp.float32), clip["legacy"], clip["ids_legacy"], clip["seed"], rounded)
    _reference(clip["legacy"], clip["ids_legacy"], state)  # restore fp32 weights


def test_clip_config_from_metadata(clip):
    state = {_unprefixed(k): v.detach().numpy() for k, v in clip["new"].state_dict().items()}
    cfg = CLIPTextConfig(**TINY, eos_token_id=EOS_NEW)
    path = clip["root"] / "meta.safetensors"
    save_file(state, str(path), metadata={CLIP_CONFIG_METADATA_KEY: json.dumps(cfg.to_dict())})
    assert read_clip_config(path) == cfg
    _check(load_clip(path, dtype=jnp.float32), clip["new"], clip["ids_new"], clip["seed"])


def test_clip_full_size_keys_and_shapes_match_transformers():
    cfg = CLIPTextConfig.vit_l14()
    hf = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        eos_token_id=2,
        projection_dim=768,
    )
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(hf)
    ref_shapes = {_unprefixed(k): tuple(v.shape) for k, v in ref.state_dict().items()}
    ref_shapes.pop("embeddings.position_ids", None)  # a buffer, not a weight
    table = clip_keymap(cfg)
    assert {k: e.shape for k, e in table.items()} == ref_shapes
    model = nnx.eval_shape(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    params = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    covered = set()
    for e in table.values():
        name = ".".join(e.target)
        stored = e.shape[::-1] if e.transpose else e.shape
        want = (cfg.layers, *stored) if e.layer is not None else stored
        assert params[name].shape == want and params[name].dtype == jnp.bfloat16, name
        covered.add(name)
    assert covered == set(params)


def _unprefixed(key: str) -> str:
    """transformers 5 writes CLIPTextModel keys without the ``text_model.`` prefix that older exports
    (FLUX's text_encoder/, ComfyUI's clip_l) carry."""
    return key.removeprefix("text_model.")


def _one_line_error(fn) -> str:
    with pytest.raises(CheckpointError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_clip_bad_files_give_one_line_errors(clip, tmp_path):
    state = {"text_model." + _unprefixed(k): v.detach().numpy() for k, v in clip["legacy"].state_dict().items()}
    fc1 = "text_model.encoder.layers.1.mlp.fc1.weight"

    def write(name, tensors, **kw):
        save_file(tensors, str(tmp_path / name), **kw)
        return tmp_path / name

    missing = write("missing.safetensors", {k: v for k, v in state.items() if k != fc1})
    assert f"missing key '{fc1}'" in _one_line_error(lambda: load_clip(missing))
    extra = write("extra.safetensors", {**state, "text_model.encoder.layers.0.mlp.fc3.weight": state[fc1]})
    assert "unexpected key 'text_model.encoder.layers.0.mlp.fc3.weight'" in _one_line_error(lambda: load_clip(extra))
    wrong = write("wrong.safetensors", {**state, fc1: np.zeros((200, 128), np.float32)})
    msg = _one_line_error(lambda: load_clip(wrong, config=CLIPTextConfig(**TINY)))
    assert "expected shape [256, 128], found [200, 128]" in msg and str(wrong) in msg
    odd = {k: v for k, v in state.items() if "token_embedding" not in k}
    odd["text_model.embeddings.token_embedding.weight"] = np.zeros((VOCAB, 96), np.float32)
    assert "heads cannot be inferred" in _one_line_error(lambda: load_clip(write("odd.safetensors", odd)))
    t5_like = write("t5.safetensors", {"encoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((4, 4))})
    assert "looks like a T5 encoder" in _one_line_error(lambda: load_clip(t5_like))
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert "without text_encoder/" in _one_line_error(lambda: load_clip(tmp_path / "pipe"))
    (tmp_path / "pipe" / "text_encoder").mkdir()
    assert "no .safetensors weights" in _one_line_error(lambda: load_clip(tmp_path / "pipe"))


def test_clip_model_checks_inputs():
    model = nnx.eval_shape(lambda: CLIPTextModel(CLIPTextConfig(**TINY), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="max_position 77"):
        model(jnp.zeros((1, 78), jnp.int32))
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig(hidden=100, heads=3)
