"""Write the torchao reference bytes that `tests/gpu/check_formats.py` compares against (run on the CPU).

python tests/gpu/make_formats_ref.py        # writes .fmtcheck/ref.npz (git-ignored; carry it to the GPU)
"""

import sys
from pathlib import Path

import numpy as np
import torch
from torchao.prototype.mx_formats.mx_tensor import MXTensor

sys.path.insert(0, "tests")
import test_formats_nvfp4 as T  # noqa: E402  (the distributions the CPU tests use)

Path(".fmtcheck").mkdir(exist_ok=True)

rng = np.random.default_rng(1234)
out = {}
for name, fn in T.DISTRIBUTIONS.items():
    x = fn(rng)[:64].astype(np.float32)
    for dt in ("fp32", "bf16"):
        xt = torch.from_numpy(x)
        if dt == "bf16":
            xt = xt.bfloat16()
        r = T._torchao(xt)
        k = f"{name}_{dt}"
        out[k + "_x"] = xt.float().numpy()
        out[k + "_codes"] = r.qdata.numpy()
        out[k + "_scales"] = r.scale.view(torch.uint8).numpy()
        out[k + "_gs"] = r.per_tensor_scale.numpy()
        out[k + "_deq"] = r.dequantize(torch.float32).numpy()
    m = MXTensor.to_mx(torch.from_numpy(x), torch.float4_e2m1fn_x2, 32)
    out[name + "_mx_codes"] = m.qdata.numpy()
    out[name + "_mx_scales"] = m.scale.view(torch.uint8).numpy()
np.savez_compressed(".fmtcheck/ref.npz", **out)
