"""T5 v1.1 encoder: fp32 parity with transformers' T5EncoderModel through our loaders, layouts, errors.

A tiny random T5 (gated GELU, 32 buckets / max distance 128) is saved by transformers; we load it
from a pipeline folder (sharded with its index) and from ComfyUI-style single files (fp16 with both
embedding keys, fp8 e4m3), and compare ``last_hidden_state`` at a sequence length > 128 (so the
logarithmic buckets, up to and past the maximum distance, are used).
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from permuquant_jax.convert import CheckpointError
from permuquant_jax.convert.encoders import T5_CONFIG_METADATA_KEY, load_t5, read_t5_config, t5_keymap
from permuquant_jax.models.t5 import T5Config, T5Encoder, relative_position_buckets

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ = 160
TINY = dict(vocab_size=300, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2)


def _hf_config(**kw):
    fields = dict(
        TINY,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        tie_word_embeddings=False,
    )
    fields.update(kw)
    return transformers.T5Config(**fields)


def _reference_model(seed: int):
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(_hf_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))  # large enough that the bias shapes the attention
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _run_reference(model, ids: np.ndarray, state: dict[str, np.ndarray] | None = None) -> np.ndarray:
    if state is not None:  # the rounded weights a file holds, back in float32
        model.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()}, strict=False)
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state.float().numpy()


@nnx.jit
def _encode(model, ids):
    return model(ids)


def _rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    seed = int(np.random.default_rng().integers(2**31))
    model = _reference_model(seed)
    state = _state(model)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TINY["vocab_size"], size=(2, SEQ)).astype(np.int32)
    ids[:, -20:] = 0  # padding, as FLUX feeds it (no attention mask)
    ids[:, -21] = 1
    root = tmp_path_factory.mktemp("t5")
    return dict(model=model, state=state, ids=ids, root=root, seed=seed)


def test_relative_position_buckets_match_transformers():
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    for n, m in ((32, 128), (16, 64), (64, 512)):
        ours = relative_position_buckets(1, 9001, n, m)[0]  # offsets 0 .. 9000
        neg = relative_position_buckets(9001, 1, n, m)[:, 0]  # offsets 0 .. -9000
        rel = torch.arange(-9000, 9001)
        ref = bucket(rel, bidirectional=True, num_buckets=n, max_distance=m).numpy()
        np.testing.assert_array_equal(np.concatenate([neg[::-1], ours[1:]]), ref)
    table = relative_position_buckets(SEQ, SEQ)
    assert table.shape == (SEQ, SEQ) and table.dtype == np.int32 and {15, 31} <= set(np.unique(table))


def test_t5_pipeline_folder_sharded_fp32_parity(t5):
    folder = t5["root"] / "pipeline"
    t5["model"].save_pretrained(folder / "text_encoder_2", max_shard_size="40KB")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    index = folder / "text_encoder_2" / "model.safetensors.index.json"
    assert index.is_file() and len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    cfg = read_t5_config(folder)
    assert cfg == T5Config(**TINY)
    ours = load_t5(folder, dtype=jnp.float32)
    ref = _run_reference(t5["model"], t5["ids"])
    out = np.asarray(_encode(ours, jnp.asarray(t5["ids"])))
    assert out.shape == ref.shape == (2, SEQ, TINY["d_model"])
    err = _rel_err(out, ref)
    assert err <= 1e-5, (err, t5["seed"])
    # Loaded in bf16, the model is as far from fp32 as transformers' own bf16 model is (relative L2).
    out16 = np.asarray(_encode(load_t5(folder / "text_encoder_2", dtype=jnp.bfloat16), jnp.asarray(t5["ids"])))
    assert out16.dtype == jnp.bfloat16
    ref16 = _run_reference(copy.deepcopy(t5["model"]).to(torch.bfloat16), t5["ids"]).astype(np.float32)
    err16, ref_err16 = (np.linalg.norm(x.astype(np.float32) - ref) / np.linalg.norm(ref) for x in (out16, ref16))
    assert err16 <= 1.25 * ref_err16 + 1e-3, (err16, ref_err16, t5["seed"])


@pytest.mark.parametrize("kind", ["fp16_both_embeddings", "fp8_embed_tokens_only"])
def test_t5_single_files_fp32_parity(t5, kind):
    state = dict(t5["state"])
    if kind == "fp16_both_embeddings":
        tensors = {k: v.astype(np.float16) for k, v in state.items()}
        tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"].copy()
    else:  # ComfyUI's fp8 file: matrices and embeddings in e4m3, norms in fp16
        tensors = {
            k: v.astype(ml_dtypes.float8_e4m3fn) if v.ndim == 2 else v.astype(np.float16) for k, v in state.items()
        }
        tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    path = t5["root"] / f"t5xxl_{kind}.safetensors"
    save_file(tensors, str(path))
    ours = load_t5(path, dtype=jnp.float32)
    rounded = {k: v.astype(np.float32) for k, v in tensors.items()}
    rounded["shared.weight"] = rounded.get("shared.weight", rounded.get("encoder.embed_tokens.weight"))
    rounded.pop("encoder.embed_tokens.weight", None)
    ref = _run_reference(t5["model"], t5["ids"], rounded)
    _run_reference(t5["model"], t5["ids"], state)  # restore the fp32 weights for the other tests
    err = _rel_err(np.asarray(_encode(ours, jnp.asarray(t5["ids"]))), ref)
    assert err <= 1e-5, (kind, err, t5["seed"])


def test_t5_full_size_keys_and_shapes_match_transformers():
    cfg = T5Config.xxl()
    hf = dict(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        num_heads=cfg.num_heads,
        d_ff=cfg.d_ff,
        num_layers=cfg.num_layers,
        feed_forward_proj="gated-gelu",
    )
    with torch.device("meta"):
        ref = transformers.T5EncoderModel(transformers.T5Config(**hf))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ref_shapes.pop("encoder.embed_tokens.weight") == ref_shapes["shared.weight"]  # tied
    table = t5_keymap(cfg)
    assert {k: e.shape for k, e in table.items()} == ref_shapes
    model = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    params = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    covered = set()
    for e in table.values():
        name = ".".join(e.target)
        stored = e.shape[::-1] if e.transpose else e.shape
        want = (cfg.num_layers, *stored) if e.layer is not None else stored
        assert params[name].shape == want and params[name].dtype == jnp.bfloat16, name
        covered.add(name)
    assert covered == set(params)
    n = sum(int(np.prod(v.shape)) for v in params.values())
    assert n == sum(int(np.prod(s)) for s in ref_shapes.values())  # 4.76e9


def test_t5_config_from_metadata_and_override(t5):
    cfg = T5Config(**TINY, relative_attention_max_distance=64)
    path = t5["root"] / "meta.safetensors"
    save_file(t5["state"], str(path), metadata={T5_CONFIG_METADATA_KEY: json.dumps(cfg.to_dict())})
    assert read_t5_config(path) == cfg
    model = load_t5(path, dtype=jnp.float32, config=T5Config(**TINY))
    assert model.config.relative_attention_max_distance == 128


def _one_line_error(fn) -> str:
    with pytest.raises(CheckpointError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_t5_bad_files_give_one_line_errors(t5, tmp_path):
    state = t5["state"]
    q0 = "encoder.block.0.layer.0.SelfAttention.q.weight"

    def write(name, tensors, **kw):
        save_file(tensors, str(tmp_path / name), **kw)
        return tmp_path / name

    missing = write("missing.safetensors", {k: v for k, v in state.items() if k != q0})
    assert "missing key 'encoder.block.0.layer.0.SelfAttention.q.weight'" in _one_line_error(lambda: load_t5(missing))
    no_embed = write(
        "no_embed.safetensors", {k: v for k, v in state.items() if "embed" not in k and k != "shared.weight"}
    )
    msg = _one_line_error(lambda: load_t5(no_embed, config=T5Config(**TINY)))
    assert "missing key 'shared.weight' (or 'encoder.embed_tokens.weight')" in msg
    extra = write("extra.safetensors", {**state, "encoder.block.0.layer.1.DenseReluDense.wi.weight": state[q0]})
    msg = _one_line_error(lambda: load_t5(extra))
    assert "unexpected key 'encoder.block.0.layer.1.DenseReluDense.wi.weight'" in msg and str(extra) in msg
    wrong = write("wrong.safetensors", {**state, q0: np.zeros((16, 32), np.float32)})
    msg = _one_line_error(lambda: load_t5(wrong, config=T5Config(**TINY)))
    assert "expected shape [32, 32], found [16, 32]" in msg and q0 in msg
    nan = dict(state)
    nan[q0] = state[q0].copy()
    nan[q0][3, 4] = np.nan
    msg = _one_line_error(lambda: load_t5(write("nan.safetensors", nan)))
    assert "NaN" in msg and q0 in msg
    clip_like = write("clip_l.safetensors", {"text_model.embeddings.token_embedding.weight": np.zeros((4, 4))})
    assert "looks like a CLIP text encoder" in _one_line_error(lambda: load_t5(clip_like))
    scaled = write("scaled.safetensors", {**state, "scaled_fp8": np.zeros((0,), np.float32)})
    assert "scaled-FP8" in _one_line_error(lambda: load_t5(scaled))
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert "without text_encoder_2/" in _one_line_error(lambda: load_t5(tmp_path / "pipe"))
    assert "no such file" in _one_line_error(lambda: load_t5(tmp_path / "nope"))
    with pytest.raises(ValueError, match="dtype"):
        load_t5(write("ok.safetensors", state), dtype=jnp.int8)


def test_t5_encoder_rejects_bad_input():
    model = nnx.eval_shape(lambda: T5Encoder(T5Config(**TINY), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="input_ids"):
        model(jnp.zeros((2, 3, 4), jnp.int32))
    with pytest.raises(ValueError, match="num_buckets"):
        T5Config(**TINY, relative_attention_num_buckets=30)
    assert jax.tree.leaves(nnx.state(model))  # abstract params exist
