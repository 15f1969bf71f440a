"""FLUX.1-dev-size text to image on one GPU: our pipeline (bf16 DiT, NVFP4 W4A4 DiT) vs diffusers' FluxPipeline.

    PYTHONPATH=. python3 benchmarks/generate.py [--res 1024] [--steps 28] [--seq 512] [--small]

Random weights made on the device, every parameter uniform with standard deviation 0.02 on both sides
(an index hash in JAX, ``uniform_`` in torch; no download), at the real configs: T5-XXL
(text_encoder_2), CLIP ViT-L/14 text (text_encoder), the FLUX.1-dev DiT (19 + 38 blocks, guidance
embedding) and the 16-channel autoencoder. Batch 1, guidance 3.5.

Three processes run one after the other, so each side's weights are freed (with its process) before
the next side starts and each peak-memory reading is that side's alone:

- ``ours-bf16``: ``generate.FluxPipeline`` with our T5/CLIP/DiT/AE modules: text encode (tokenizers
  + T5 + CLIP, also T5 and CLIP timed alone), release of the text encoders, denoise (the whole Euler
  loop in one jit), AE decode.
- ``ours-nvfp4``: the same DiT with every linear NVFP4 W4A4 (RTN via ``QuantLinear.from_linear``,
  quantized one stacked layer at a time so no 16-bit copy of the whole DiT is ever resident; static
  activation global scale, as benchmarks/flux_step.py), dispatched by ``kernels.dispatch`` "auto";
  denoise + decode (the text encoders are the bf16 run's: the T5/CLIP rows hold for both).
- ``diffusers``: diffusers' ``FluxPipeline`` (torch, bf16, SDPA attention) from ``FluxTransformer2DModel``,
  transformers' ``T5EncoderModel`` / ``CLIPTextModel`` and ``AutoencoderKL`` built directly on the
  device; tokenizers are transformers' ``CLIPTokenizer`` (the CLIP vocabulary shipped in
  permuquant_jax/assets) and a ``PreTrainedTokenizerFast`` of the embedded tiny pipeline's T5
  ``tokenizer.json``; the prompt is encoded by ``pipe.encode_prompt``, the text encoders are then
  freed, and the pipeline is called with ``prompt_embeds`` and ``output_type="latent"``; the VAE
  decode is timed alone (the pipeline's unpack + unscale + ``vae.decode``).

Both sides release the text encoders before denoising. Every phase is run twice (T5/CLIP/encode
three more times, median): "first" includes JAX's compilation (ours) or torch's first-call warm-up
(diffusers); "steady" is the second run. Peak device memory is the allocator's high-water mark of
the process after each phase (JAX ``peak_bytes_in_use``; torch ``max_memory_allocated``), so it
includes every earlier phase. Prints the table last; writes $OUT (or --out) generate_*.json and
generate_table.md. ``--small``: tiny configs, 64x64, 2 steps (a CPU smoke test of this script).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

REPO = Path(__file__).resolve().parent.parent
SIDES = ("ours-bf16", "ours-nvfp4", "diffusers")
PROMPT = "a photograph of an astronaut riding a horse on the moon, earth in the sky, film grain, 35mm"
WEIGHT_STD = 0.02
UNIFORM_HALF_WIDTH = WEIGHT_STD * math.sqrt(3.0)  # uniform weights in [-a, a) have standard deviation a / sqrt(3)
ACT_GLOBAL_SCALE = 0.05


def now() -> float:
    return time.perf_counter()


class Recorder:
    """Collects one side's numbers and rewrites its json after each phase (a killed run keeps what it had)."""

    def __init__(self, side: str, out: Path | None, info: dict):
        self.side, self.out = side, out
        self.data = {"side": side, **info, "phases": {}, "memory": {}, "params": {}, "notes": []}

    def phase(self, name: str, **values) -> None:
        self.data["phases"][name] = values
        print(f"[{self.side}] {name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()), flush=True)
        self.save()

    def memory(self, after: str, peak: int | None, in_use: int | None) -> None:
        self.data["memory"][after] = {"peak_bytes": peak, "bytes_in_use": in_use}
        gib = (lambda b: "-" if b is None else f"{b / 2**30:.2f} GiB")
        print(f"[{self.side}] memory after {after}: peak {gib(peak)}, in use {gib(in_use)}", flush=True)
        self.save()

    def save(self) -> None:
        if self.out is not None:
            tmp = self.out / f".generate_{self.side}.json.tmp"
            tmp.write_text(json.dumps(self.data, indent=1, default=str))
            tmp.replace(self.out / f"generate_{self.side}.json")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def timed(fn, repeat: int = 1, sync=lambda x: x):
    """(first wall time, median of ``repeat`` further calls, last result)."""
    t = now()
    out = sync(fn())
    first = now() - t
    times = []
    for _ in range(repeat):
        t = now()
        out = sync(fn())
        times.append(now() - t)
    times.sort()
    return first, times[len(times) // 2], out


# --------------------------------------------------------------------------- our side (JAX)


def configs(small: bool):
    from permuquant_jax.models.autoencoder import AutoEncoderConfig
    from permuquant_jax.models.clip import CLIPTextConfig
    from permuquant_jax.models.flux import FluxConfig
    from permuquant_jax.models.t5 import T5Config

    if small:
        t5, clip, ae = T5Config.tiny(), CLIPTextConfig.tiny(), AutoEncoderConfig.tiny()
        dit = FluxConfig(hidden_size=256, num_heads=2, axes_dim=(16, 56, 56), depth=1, depth_single_blocks=1,
                         context_in_dim=t5.d_model, vec_in_dim=clip.hidden)
    else:
        t5, clip, ae, dit = T5Config.xxl(), CLIPTextConfig.vit_l14(), AutoEncoderConfig.flux(), FluxConfig()
    return t5, clip, dit, ae


@functools.partial(jax.jit, static_argnums=(1, 2))
def _uniform(seed: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """Values uniform in [-a, a) with standard deviation WEIGHT_STD, from a hash of each element's index
    and ``seed`` (one small elementwise kernel: no threefry program to compile, no temporary)."""
    x = jax.lax.iota(jnp.uint32, math.prod(shape)) * jnp.uint32(0x9E3779B1) + seed.astype(jnp.uint32)
    for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, None)):  # murmur3's finalizer
        x = x ^ (x >> shift)
        if mult is not None:
            x = x * jnp.uint32(mult)
    u = (x >> 8).astype(jnp.float32) * (2.0 / (1 << 24)) - 1.0
    return (UNIFORM_HALF_WIDTH * u).astype(dtype).reshape(shape)


def randomize(module, seed: int) -> int:
    """Give every still-abstract variable of ``module`` values made on the device (:func:`_uniform`,
    one kernel per variable); returns their bytes."""
    total = 0
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(module))):
        spec = var.get_value()
        if not isinstance(spec, jax.ShapeDtypeStruct):
            continue
        if jnp.issubdtype(spec.dtype, jnp.floating):
            value = _uniform(jnp.uint32(seed * 100003 + i), tuple(spec.shape), spec.dtype)
        else:
            value = jnp.zeros(spec.shape, spec.dtype)
        var.set_value(value)
        total += value.nbytes
    jax.block_until_ready(nnx.state(module))
    return total


def quantized_random_dit(cfg, seed: int):
    """The DiT with every linear NVFP4 (RTN of random 16-bit weights), quantized one layer of a stack at a
    time on the device; the other parameters random. Returns (model, number of linears)."""
    from permuquant_jax.models.flux import abstract_flux
    from permuquant_jax.quant.linear import QuantLinear
    from permuquant_jax.quant.paths import find_linears, path_str, set_node

    class _Slice:  # what QuantLinear.from_linear reads of a float linear
        def __init__(self, kernel, bias):
            self.kernel = nnx.Param(kernel)
            self.bias = None if bias is None else nnx.Param(bias)

    model = abstract_flux(cfg, jnp.bfloat16)
    lins = find_linears(model)
    for li, (path, lin) in enumerate(lins.items()):
        kspec = lin.kernel.get_value()
        bias = getattr(lin, "bias", None)
        bspec = None if bias is None else bias.get_value()
        stack, (k, n) = tuple(kspec.shape[:-2]), kspec.shape[-2:]
        layers = []
        for j in range(math.prod(stack)):
            s = seed * 7919 + li * 1009 + j * 2
            kernel = _uniform(jnp.uint32(s), (k, n), kspec.dtype)
            b = None if bspec is None else _uniform(jnp.uint32(s + 1), (n,), bspec.dtype)
            q = QuantLinear.from_linear(_Slice(kernel, b), format="nvfp4", act_global_scale=ACT_GLOBAL_SCALE,
                                        name=f"{path_str(path)}[{j}]")
            layers.append(q)
            del kernel, b
        if not stack:
            set_node(model, path, layers[0])
            continue
        full = nnx.eval_shape(functools.partial(QuantLinear, k, n, format="nvfp4", stack=stack,
                                                use_bias=bspec is not None, param_dtype=kspec.dtype))
        per_layer = [dict(nnx.to_flat_state(nnx.state(q))) for q in layers]
        for p, var in nnx.to_flat_state(nnx.state(full)):
            parts = [d[p].get_value() for d in per_layer]
            if parts[0] is None:
                continue
            var.set_value(jnp.stack([jnp.asarray(x) for x in parts]).reshape(*stack, *jnp.shape(parts[0])))
        del layers, per_layer
        set_node(model, path, full)
    randomize(model, seed + 1)
    return model, len(lins)


def param_bytes(module) -> int:
    return int(sum(a.nbytes for a in jax.tree.leaves(nnx.state(module)) if hasattr(a, "nbytes")))


def param_count(module) -> int:
    return int(sum(a.size for a in jax.tree.leaves(nnx.state(module, nnx.Param))
                   if hasattr(a, "size") and jnp.issubdtype(a.dtype, jnp.floating)))


def run_ours(args, rec: Recorder, quantized: bool) -> None:
    from permuquant_jax.generate import pipeline as gp
    from permuquant_jax.generate.tokenizers import load_clip_tokenizer, load_t5_tokenizer
    from permuquant_jax.kernels import dispatch
    from permuquant_jax.models.autoencoder import AutoEncoder
    from permuquant_jax.models.clip import CLIPTextModel
    from permuquant_jax.models.flux import FluxDiT
    from permuquant_jax.models.sampling import prepare_txt_ids
    from permuquant_jax.models.t5 import T5Encoder

    dispatch.filter_triton_deprecation()
    dtype = jnp.float32 if args.small else jnp.bfloat16
    t5_cfg, clip_cfg, dit_cfg, ae_cfg = configs(args.small)
    dev = jax.devices()[0]
    rec.data.update(device=dev.device_kind, backend=jax.default_backend(), dtype=jnp.dtype(dtype).name,
                    nvfp4_backend=dispatch.resolve_backend("auto") if quantized else None)

    def mem(after: str) -> None:
        s = dev.memory_stats() or {}
        rec.memory(after, s.get("peak_bytes_in_use"), s.get("bytes_in_use"))

    def abstract(build):
        return nnx.eval_shape(build)

    def ready(x):
        return jax.block_until_ready(x)

    t5_tok = load_t5_tokenizer(gp.embedded_pipeline_dir() / "tokenizer_2", args.seq)
    clip_tok = load_clip_tokenizer(None)
    pipe = gp.FluxPipeline(dit=None, t5=None, clip=None, ae=None, t5_tokenizer=t5_tok, clip_tokenizer=clip_tok,
                           dit_config=dit_cfg, description="random weights")
    b = 1
    if not quantized:
        t = now()
        t5 = abstract(lambda: T5Encoder(t5_cfg, rngs=nnx.Rngs(0), dtype=dtype))
        randomize(t5, 1)
        clip = abstract(lambda: CLIPTextModel(clip_cfg, rngs=nnx.Rngs(0), dtype=dtype))
        randomize(clip, 2)
        rec.data["params"].update(t5=param_count(t5), clip=param_count(clip), t5_bytes=param_bytes(t5),
                                  clip_bytes=param_bytes(clip))
        rec.phase("init text encoders", wall_s=now() - t)
        mem("init text encoders")
        pipe._loaded.update(t5=t5, clip=clip)
        t5_ids = jnp.asarray(t5_tok([PROMPT]))
        clip_ids = jnp.asarray(clip_tok([PROMPT]))
        first, steady, (txt, txt_ids, y) = timed(lambda: pipe.encode_prompts([PROMPT]), 3, ready)
        rec.phase("text encode", first_s=first, steady_s=steady, note="tokenizers + T5 + CLIP (encode_prompts)")
        _, steady, _ = timed(lambda: gp._clip_pooled(clip, clip_ids), 3, ready)  # compiled by encode_prompts
        rec.phase("clip", steady_s=steady, tokens=int(clip_ids.shape[1]))
        _, steady, _ = timed(lambda: gp._t5_forward(t5, t5_ids), 3, ready)
        rec.phase("t5", steady_s=steady, tokens=int(t5_ids.shape[1]))
        mem("text encode")
        freed = pipe.release_text_encoders()
        t5 = clip = None
        rec.data["notes"].append(f"released text encoders: {freed / 2**30:.2f} GiB")
        t = now()
        dit = abstract(lambda: FluxDiT(dit_cfg, rngs=nnx.Rngs(0), dtype=dtype))
        randomize(dit, 3)
        rec.phase("init dit", wall_s=now() - t)
    else:  # the text encoders are the bf16 run's; the DiT sees inputs of the same shapes and dtypes
        rng = jax.random.key(7)
        txt = jax.random.normal(rng, (b, args.seq, t5_cfg.d_model), jnp.float32)
        txt_ids = prepare_txt_ids(b, args.seq)
        y = jax.random.normal(jax.random.fold_in(rng, 1), (b, clip_cfg.hidden), jnp.float32)
        t = now()
        dit, n_lin = quantized_random_dit(dit_cfg, 3)
        rec.phase("init dit", wall_s=now() - t, linears_quantized=n_lin)
    rec.data["params"].update(dit=param_count(dit), dit_bytes=param_bytes(dit))
    mem("init dit")
    pipe._loaded["dit"] = dit
    noise = pipe.noise([0], args.res, args.res)

    def sample():
        return pipe.sample(jnp.asarray(txt), jnp.asarray(txt_ids), jnp.asarray(y), noise, steps=args.steps,
                           guidance=args.guidance)

    first, steady, lat = timed(sample, 1, ready)
    rec.phase("denoise", first_s=first, steady_s=steady, per_step_ms=1e3 * steady / args.steps, steps=args.steps,
              finite=bool(jnp.isfinite(lat).all()))
    mem("denoise")
    t = now()
    ae = abstract(lambda: AutoEncoder(ae_cfg, rngs=nnx.Rngs(0), dtype=dtype))
    randomize(ae, 4)
    rec.data["params"].update(ae=param_count(ae), ae_bytes=param_bytes(ae))
    rec.phase("init ae", wall_s=now() - t)
    pipe._loaded["ae"] = ae
    first, steady, img = timed(lambda: pipe.decode(lat, args.res, args.res), 1, ready)
    rec.phase("decode", first_s=first, steady_s=steady, shape=list(img.shape), finite=bool(jnp.isfinite(img).all()))
    mem("decode")


# --------------------------------------------------------------------------- diffusers' side (torch)


def run_diffusers(args, rec: Recorder) -> None:
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from permuquant_jax.generate.pipeline import embedded_pipeline_dir
    from permuquant_jax.generate.tokenizers import default_clip_tokenizer_path

    t5_cfg, clip_cfg, dit_cfg, ae_cfg = configs(args.small)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float32 if args.small else torch.bfloat16
    rec.data.update(device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                    dtype=str(dtype), torch=torch.__version__, diffusers=diffusers.__version__,
                    transformers=transformers.__version__)
    if not cuda:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    def sync(x=None):
        if cuda:
            torch.cuda.synchronize()
        return x

    def mem(after: str) -> None:
        if cuda:
            rec.memory(after, torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated())
        else:
            rec.memory(after, None, None)

    def build(make):
        """A module made on the device in ``dtype``, every parameter uniform with std 0.02 (as ours)."""
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with device:
                m = make()
        finally:
            torch.set_default_dtype(old)
        with torch.no_grad():
            for p in m.parameters():
                p.uniform_(-UNIFORM_HALF_WIDTH, UNIFORM_HALF_WIDTH)
        return m.eval().requires_grad_(False)

    def count(m) -> int:
        return sum(p.numel() for p in m.parameters())

    def nbytes(m) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    clip_dir = default_clip_tokenizer_path()
    tokenizer = transformers.CLIPTokenizer(str(clip_dir / "vocab.json"), str(clip_dir / "merges.txt"),
                                           model_max_length=clip_cfg.max_position)
    tokenizer_2 = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(embedded_pipeline_dir() / "tokenizer_2" / "tokenizer.json"),
        eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=args.seq)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    with torch.inference_mode():
        t = now()
        t5 = build(lambda: transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=t5_cfg.vocab_size, d_model=t5_cfg.d_model, d_kv=t5_cfg.d_kv, num_heads=t5_cfg.num_heads,
            d_ff=t5_cfg.d_ff, num_layers=t5_cfg.num_layers, feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=t5_cfg.relative_attention_num_buckets,
            relative_attention_max_distance=t5_cfg.relative_attention_max_distance,
            layer_norm_epsilon=t5_cfg.eps, dropout_rate=0.0)))
        clip = build(lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=clip_cfg.vocab_size, hidden_size=clip_cfg.hidden, intermediate_size=clip_cfg.intermediate,
            num_attention_heads=clip_cfg.heads, num_hidden_layers=clip_cfg.layers,
            max_position_embeddings=clip_cfg.max_position, hidden_act=clip_cfg.hidden_act,
            layer_norm_eps=clip_cfg.eps, eos_token_id=2, bos_token_id=0, pad_token_id=1)))
        sync()
        rec.data["params"].update(t5=count(t5), clip=count(clip), t5_bytes=nbytes(t5), clip_bytes=nbytes(clip))
        rec.data["attention"] = {"t5": t5.config._attn_implementation, "clip": clip.config._attn_implementation}
        rec.phase("init text encoders", wall_s=now() - t)
        mem("init text encoders")
        t5_ids = tokenizer_2([PROMPT], padding="max_length", max_length=args.seq, truncation=True,
                             return_tensors="pt").input_ids.to(device)
        clip_ids = tokenizer([PROMPT], padding="max_length", max_length=clip_cfg.max_position, truncation=True,
                             return_tensors="pt").input_ids.to(device)
        enc = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=clip, tokenizer=tokenizer,
                           text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=None)
        first, steady, (pe, ppe, _) = timed(
            lambda: enc.encode_prompt(prompt=PROMPT, prompt_2=PROMPT, device=device, max_sequence_length=args.seq),
            3, sync)
        rec.phase("text encode", first_s=first, steady_s=steady, note="pipe.encode_prompt (tokenizers + T5 + CLIP)")
        _, steady, _ = timed(lambda: clip(clip_ids, output_hidden_states=False).pooler_output, 3, sync)
        rec.phase("clip", steady_s=steady, tokens=int(clip_ids.shape[1]))
        _, steady, _ = timed(lambda: t5(t5_ids, output_hidden_states=False)[0], 3, sync)
        rec.phase("t5", steady_s=steady, tokens=int(t5_ids.shape[1]))
        mem("text encode")
        enc = t5 = clip = None  # free the text encoders (diffusers' pipeline holds none after this)
        import gc

        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        rec.data["notes"].append("text encoders freed before the transformer was built")
        t = now()
        transformer = build(lambda: FluxTransformer2DModel(
            patch_size=1, in_channels=dit_cfg.in_channels, num_layers=dit_cfg.depth,
            num_single_layers=dit_cfg.depth_single_blocks, attention_head_dim=dit_cfg.hidden_size // dit_cfg.num_heads,
            num_attention_heads=dit_cfg.num_heads, joint_attention_dim=dit_cfg.context_in_dim,
            pooled_projection_dim=dit_cfg.vec_in_dim, guidance_embeds=dit_cfg.guidance_embed,
            axes_dims_rope=tuple(dit_cfg.axes_dim)))
        sync()
        rec.data["params"].update(dit=count(transformer), dit_bytes=nbytes(transformer))
        rec.phase("init dit", wall_s=now() - t)
        mem("init dit")
        t = now()
        vae = build(lambda: AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(ae_cfg.ch_mult),
            up_block_types=("UpDecoderBlock2D",) * len(ae_cfg.ch_mult),
            block_out_channels=tuple(ae_cfg.ch * m for m in ae_cfg.ch_mult), layers_per_block=ae_cfg.num_res_blocks,
            latent_channels=ae_cfg.z_channels, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
            scaling_factor=ae_cfg.scale_factor, shift_factor=ae_cfg.shift_factor))
        sync()
        rec.data["params"]["ae"] = count(vae)
        rec.phase("init ae", wall_s=now() - t)
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=tokenizer, text_encoder_2=None,
                            tokenizer_2=tokenizer_2, transformer=transformer)
        pipe.set_progress_bar_config(disable=True)

        def sample():
            return pipe(prompt_embeds=pe, pooled_prompt_embeds=ppe, height=args.res, width=args.res,
                        num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="latent",
                        generator=torch.Generator(device).manual_seed(0)).images

        first, steady, lat = timed(sample, 1, sync)
        rec.phase("denoise", first_s=first, steady_s=steady, per_step_ms=1e3 * steady / args.steps, steps=args.steps,
                  finite=bool(torch.isfinite(lat).all()))
        mem("denoise")

        def decode():
            z = pipe._unpack_latents(lat, args.res, args.res, pipe.vae_scale_factor)
            z = z / vae.config.scaling_factor + vae.config.shift_factor
            return vae.decode(z, return_dict=False)[0]

        first, steady, img = timed(decode, 1, sync)
        rec.phase("decode", first_s=first, steady_s=steady, shape=list(img.shape),
                  finite=bool(torch.isfinite(img).all()))
        mem("decode")


# --------------------------------------------------------------------------- driver and table


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "torch", "diffusers", "transformers", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def table(results: dict, args) -> str:
    cols = [s for s in SIDES if s in results]
    names = {"ours-bf16": "ours bf16", "ours-nvfp4": "ours NVFP4 W4A4", "diffusers": "diffusers bf16 (torch)"}

    def ph(side: str, name: str) -> dict | None:
        r = results.get(side) or {}
        return (r.get("phases") or {}).get(name)

    def cell(side: str, name: str, key: str = "steady_s", scale: float = 1e3, unit: str = "ms",
             shared_from: str | None = None, digits: int = 1) -> str:
        p = ph(side, name)
        if p is None and shared_from is not None and ph(shared_from, name) is not None:
            return "= bf16"
        if p is None or p.get(key) is None:
            return "-"
        return f"{p[key] * scale:.{digits}f} {unit}".strip()

    def first_cell(side: str, name: str, shared_from: str | None = None) -> str:
        p = ph(side, name)
        if p is None and shared_from is not None and ph(shared_from, name) is not None:
            return "= bf16"
        if p is None:
            return "-"
        return f"{p['first_s']:.2f} s ({p['first_s'] - p['steady_s']:.2f})"

    def peak(side: str, after: str) -> str:
        m = ((results.get(side) or {}).get("memory") or {}).get(after) or {}
        return "-" if m.get("peak_bytes") is None else f"{m['peak_bytes'] / 2**30:.1f}"

    def total(side: str) -> str:
        parts = []
        for name in ("text encode", "denoise", "decode"):
            p = ph(side, name) or (ph("ours-bf16", name) if side == "ours-nvfp4" and name == "text encode" else None)
            if p is None:
                return "-"
            parts.append(p["steady_s"])
        return f"{sum(parts):.2f} s"

    def params(side: str, key: str):
        return ((results.get(side) or {}).get("params") or {}).get(key)

    sh = {s: ("ours-bf16" if s == "ours-nvfp4" else None) for s in cols}
    rows = [
        (f"T5-XXL encode, {args.seq} tokens", lambda s: cell(s, "t5", shared_from=sh[s])),
        ("CLIP-L encode, 77 tokens", lambda s: cell(s, "clip", shared_from=sh[s])),
        ("**text encode** (tokenize + T5 + CLIP)", lambda s: cell(s, "text encode", shared_from=sh[s])),
        (f"**denoise**, {args.steps} steps", lambda s: cell(s, "denoise", scale=1, unit="s", digits=2)),
        ("  per step", lambda s: cell(s, "denoise", "per_step_ms", scale=1)),
        (f"**VAE decode** {args.res}x{args.res}", lambda s: cell(s, "decode")),
        ("**total** (encode + denoise + decode)", total),
        ("first call s (minus steady: compile / warm-up): text encode", lambda s: first_cell(s, "text encode", sh[s])),
        ("  denoise", lambda s: first_cell(s, "denoise")),
        ("  decode", lambda s: first_cell(s, "decode")),
        ("peak device memory GiB after text encode", lambda s: peak(s, "text encode") if s != "ours-nvfp4" else "-"),
        ("  after denoise (text encoders released)", lambda s: peak(s, "denoise")),
        ("  after decode", lambda s: peak(s, "decode")),
        ("DiT weights GiB", lambda s: _gib(params(s, "dit_bytes"))),
        ("params (B): DiT / T5 / CLIP / AE", lambda s: " / ".join(
            "-" if params(s, k) is None else f"{params(s, k) / 1e9:.4f}" for k in ("dit", "t5", "clip", "ae"))),
    ]
    head = "| phase | " + " | ".join(names[s] for s in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(s) for s in cols) + " |")
    return "\n".join(lines)


def _gib(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def drive(args) -> int:
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    start = now()
    reserve = {"ours-bf16": 0, "ours-nvfp4": 60, "diffusers": 70}  # seconds kept for the sides after
    rcs = {}
    for i, side in enumerate(SIDES):
        left = args.budget - (now() - start) - sum(reserve[s] for s in SIDES[i + 1:])
        cmd = [sys.executable, __file__, "--side", side, "--res", str(args.res), "--steps", str(args.steps),
               "--seq", str(args.seq), "--guidance", str(args.guidance)] + (["--small"] if args.small else [])
        if out is not None:
            cmd += ["--out", str(out)]
        print(f"== {side} (limit {left:.0f} s) ==", flush=True)
        t = now()
        try:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if side == "diffusers":  # JAX is imported there (the tokenizer paths) but must take no GPU memory
                env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
            rcs[side] = subprocess.run(cmd, timeout=max(left, 10), env=env).returncode
        except subprocess.TimeoutExpired:
            rcs[side] = "timeout"
        print(f"== {side}: rc {rcs[side]}, {now() - t:.0f} s ==", flush=True)
    results = {}
    if out is not None:
        for side in SIDES:
            f = out / f"generate_{side}.json"
            if f.is_file():
                results[side] = json.loads(f.read_text())
    text = table(results, args)
    dev = next((r.get("device") for r in results.values() if r.get("device")), "?")
    head = (f"# FLUX.1-dev-size text to image, {args.res}x{args.res}, {args.steps} steps, batch 1, guidance "
            f"{args.guidance}, random weights; {dev}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
            f"# versions: {json.dumps(versions())}; return codes: {json.dumps(rcs)}\n")
    if out is not None:
        (out / "generate_table.md").write_text(head + text + "\n")
    print(head + text, flush=True)
    return 0 if all(rc == 0 for rc in rcs.values()) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--res", type=int, default=None, help="image height and width (default 1024; --small 64)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 28; --small 2)")
    ap.add_argument("--seq", type=int, default=None, help="T5 tokens (default 512; --small 32)")
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--small", action="store_true", help="tiny configs, both sides (CPU smoke test of this script)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for the json files and the table ($OUT)")
    ap.add_argument("--budget", type=float, default=280.0, help="seconds for all three sides together")
    ap.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.res = args.res or (64 if args.small else 1024)
    args.steps = args.steps or (2 if args.small else 28)
    args.seq = args.seq or (32 if args.small else 512)
    if args.side is None:
        return drive(args)
    sys.path.insert(0, str(REPO))
    rec = Recorder(args.side, Path(args.out) if args.out else None,
                   {"res": args.res, "steps": args.steps, "seq": args.seq, "guidance": args.guidance,
                    "small": args.small, "prompt": PROMPT, "versions": versions()})
    t = now()
    if args.side == "diffusers":
        run_diffusers(args, rec)
    else:
        run_ours(args, rec, quantized=args.side == "ours-nvfp4")
    rec.data["wall_s"] = now() - t
    rec.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
