"""models.frozen.frozen_jit: the result of nnx.jit without the module's weights as outputs."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from permuquant_jax.models.frozen import frozen_jit


class _Net(nnx.Module):
    def __init__(self):
        self.a = nnx.Linear(64, 64, rngs=nnx.Rngs(0))
        self.b = nnx.Linear(64, 64, rngs=nnx.Rngs(1))

    def __call__(self, x, scale=1.0):
        return self.b(jnp.tanh(self.a(x))) * scale


def test_frozen_jit_same_result_no_weight_outputs_one_compile():
    net, x = _Net(), jnp.linspace(-1, 1, 128).reshape(2, 64)
    f = frozen_jit(lambda m, v: m(v))
    g = frozen_jit(static_argnames="scale")(lambda m, v, scale: m(v, scale=scale))
    np.testing.assert_array_equal(np.asarray(f(net, x)), np.asarray(nnx.jit(lambda m, v: m(v))(net, x)))
    np.testing.assert_allclose(np.asarray(g(net, x, scale=2.0)), 2 * np.asarray(net(x)), rtol=1e-6)
    # nnx.jit's program returns every variable (here 2 x 64 x 65 floats); frozen_jit's only the [2, 64] result
    assert f.lower(net, x).compile().memory_analysis().output_size_in_bytes == 2 * 64 * 4
    # a second split of the same module hits the same compilation
    before = f.jitted._cache_size()
    f(net, x + 1)
    assert f.jitted._cache_size() == before == 1
