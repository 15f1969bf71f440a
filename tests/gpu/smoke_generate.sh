#!/usr/bin/env bash
# GPU smoke run of the text-to-image path on the embedded tiny pipeline: convert on real prompts
# (layer-level acceptance, small calibration), then generate with the quantized DiT (Pallas kernels)
# and with the float DiT. Prints both summaries; PNGs go to $OUT.
set -euo pipefail
export PYTHONUNBUFFERED=1
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
python3 -m permuquant_jax.convert --prompts permuquant_jax/generate/prompts.txt --out /tmp/q --calib-samples 2 \
  --heldout-samples 1 --timesteps 2 --steps 4 --accept layer --no-progress 2>&1 | tail -9
python3 -m permuquant_jax.generate --quantized /tmp/q --prompt "a red fox in the snow" --out "$OUT/nvfp4" --no-progress
python3 -m permuquant_jax.generate --prompt "a red fox in the snow" --out "$OUT/float" --no-progress
