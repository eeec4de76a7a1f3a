"""``jattri._products.tmatmul``: xᵀy, in the form XLA's CPU backend gives to YNNPACK."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattri import _jit
from jattri._products import tmatmul, transposed_result


@pytest.mark.parametrize("a,b", [(3, 17), (17, 3), (9, 9)])
def test_tmatmul_is_x_transposed_times_y(a, b):
    """Both branches (either operand the narrower), batched, against float64 numpy."""
    rng = np.random.default_rng(a * 100 + b)
    x = rng.standard_normal((2, 40, a)).astype(np.float32)
    y = rng.standard_normal((2, 40, b)).astype(np.float32)
    want = np.einsum("mna,mnb->mab", x.astype(np.float64), y.astype(np.float64))
    got = jax.jit(tmatmul)(x, y)
    assert got.shape == (2, a, b)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(tmatmul(x[0], y[0]), np.float64), want[0],
                               rtol=1e-5, atol=1e-5)


def _left_contractions(fn, *args) -> list:
    """The left operand's contracting dimensions of every product XLA compiled for
    ``fn`` with jattri's CPU options."""
    compiled = jax.jit(fn, compiler_options=_jit.cpu_options()).lower(*args).compile()
    return re.findall(r" dot\(.*?lhs_contracting_dims=\{(\d+)\}", compiled.as_text())


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU backend's products")
@pytest.mark.parametrize("a,b", [(785, 10), (10, 785), (512, 512)])
def test_tmatmul_contracts_the_left_operand_along_its_last_axis(a, b):
    """XLA's CPU backend hands YNNPACK no product whose left operand is contracted along
    its first axis; written as xᵀy, every one of these shapes compiles to such a
    product (checked below, so the test would see XLA change), through ``tmatmul``
    to none."""
    x = jnp.ones((600, a), jnp.float32)
    y = jnp.ones((600, b), jnp.float32)
    assert "0" in _left_contractions(lambda u, v: u.T @ v, x, y)
    found = _left_contractions(tmatmul, x, y)
    assert found and all(d == "1" for d in found), found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU backend's products")
def test_a_product_transposed_after_it_is_made_keeps_its_form():
    """(s q)ᵀ written bare compiles to qᵀ sᵀ, a product contracted along the left
    operand's first axis; ``transposed_result`` keeps s q, then copies."""
    s, q = jnp.ones((600, 10), jnp.float32), jnp.ones((10, 10), jnp.float32)
    assert "0" in _left_contractions(lambda u, v: (u @ v).T, s, q)
    found = _left_contractions(lambda u, v: transposed_result(u @ v), s, q)
    assert found and all(d == "1" for d in found), found
    np.testing.assert_allclose(transposed_result(s @ q), (s @ q).T)
