"""Flax ports of the dattri benchmark models against PyTorch, without torch.

The fixtures in tests/fixtures/models/ were written by tests/make_model_fixtures.py with
real PyTorch, dattri's model code and HF transformers: small instances of every
architecture (reference parameter names, random parameters and BatchNorm statistics),
inputs, and PyTorch's eval-mode logits. Here they are read with the torch-free
``jattri.interop.load_pt``, converted with ``jattri.interop.convert`` and run through the
Flax modules. Tolerance: float32 on both sides, ``rtol=1e-5`` and ``atol=1e-5`` (logits
are O(1), max |logit| 1 to 4, so the atol is 1e-5 relative to their scale and only
matters for logits near zero).
"""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattri.interop import convert, load_pt
from jattri.models import build

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "models"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
RTOL, ATOL = 1e-5, 1e-5


def load_case(case: str):
    """(state_dict or checkpoint dict, arch, config, inputs, PyTorch logits) of a fixture."""
    io = np.load(FIXTURES / f"{case}_io.npz")
    entry = MANIFEST[case]
    return load_pt(FIXTURES / f"{case}.pt"), entry["arch"], entry["config"], io["x"], io["logits"]


def jitted_apply(arch, config):
    """``(variables, x, key or None) -> logits``; dropout active when a key is given."""
    module = build(arch, **config).module

    @jax.jit
    def apply(variables, x, key=None):
        if key is None:
            return module.apply(variables, x)
        return module.apply(variables, x, deterministic=False, rngs={"dropout": key})
    return apply


def flax_logits(state_dict, arch, config, x):
    variables = convert(state_dict, arch, **config)
    return np.asarray(jitted_apply(arch, config)(variables, jnp.asarray(x)))


def test_every_architecture_has_a_fixture():
    assert {e["arch"] for e in MANIFEST.values()} == {
        "mnist_lr", "mnist_mlp", "resnet9", "nanogpt", "music_transformer", "gpt2"}


@pytest.mark.parametrize("case", sorted(MANIFEST))
def test_logits_match_pytorch(case):
    state_dict, arch, config, x, expected = load_case(case)
    got = flax_logits(state_dict, arch, config, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_resnet9_variables_layout():
    state_dict, arch, config, _, _ = load_case("resnet9")
    variables = convert(state_dict, arch, **config)
    assert set(variables) == {"params", "batch_stats"}
    bn = variables["batch_stats"]["layer1"]["shortcut_bn"]
    np.testing.assert_array_equal(bn["mean"], state_dict["layer1.0.shortcut.1.running_mean"])
    np.testing.assert_array_equal(bn["var"], state_dict["layer1.0.shortcut.1.running_var"])
    kernel = variables["params"]["layer2"]["conv1"]["kernel"]           # HWIO
    np.testing.assert_array_equal(kernel[1, 2, 3, 4], state_dict["layer2.0.conv1.weight"][4, 3, 1, 2])


def test_fixtures_are_sensitive_to_what_they_check():
    # Running statistics ignored (reset to 0/1) -> ResNet-9 logits are off.
    state_dict, arch, config, x, expected = load_case("resnet9")
    reset = {k: (np.zeros_like(v) if k.endswith("running_mean") else
                 np.ones_like(v) if k.endswith("running_var") else v)
             for k, v in state_dict.items()}
    assert not np.allclose(flax_logits(reset, arch, config, x), expected, rtol=RTOL, atol=ATOL)
    # Relative positions reversed (Er flipped) -> Music Transformer logits are off.
    state_dict, arch, config, x, expected = load_case("music_transformer")
    flipped = {k: (v[::-1] if k.endswith(".Er") else v) for k, v in state_dict.items()}
    assert not np.allclose(flax_logits(flipped, arch, config, x), expected, rtol=RTOL, atol=ATOL)


def test_gpt_head_may_be_absent_but_must_be_tied():
    state_dict, arch, config, x, expected = load_case("gpt2")
    untied = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    np.testing.assert_allclose(flax_logits(untied, arch, config, x), expected,
                               rtol=RTOL, atol=ATOL)
    untied["lm_head.weight"] = state_dict["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match=r"untied weights.*lm_head\.weight differs"):
        convert(untied, arch, **config)


def test_gpt2_headless_hub_layout():
    # The hub's GPT2Model file: no "transformer." level, no lm_head, causal-mask buffers.
    state_dict, arch, config, x, expected = load_case("gpt2")
    hub = {k[len("transformer."):]: v for k, v in state_dict.items()
           if k.startswith("transformer.")}
    hub["h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), bool))
    hub["h.0.attn.masked_bias"] = np.float32(-1e4)
    np.testing.assert_allclose(flax_logits(hub, arch, config, x), expected, rtol=RTOL, atol=ATOL)


def test_convert_lists_missing_unexpected_and_misshapen_keys():
    state_dict, arch, config, _, _ = load_case("resnet9")
    broken = dict(state_dict)
    del broken["layer2.0.bn1.running_var"]
    del broken["linear.bias"]
    broken["layer4.0.conv1.weight"] = np.zeros((3, 3, 3, 3), np.float32)
    broken["layer1.0.conv2.weight"] = np.zeros((16, 16, 5, 5), np.float32)
    with pytest.raises(ValueError) as info:
        convert(broken, arch, **config)
    message = str(info.value)
    assert "missing keys (2): layer2.0.bn1.running_var; linear.bias" in message
    assert "unexpected keys (1): layer4.0.conv1.weight" in message
    assert ("shape mismatches (1): layer1.0.conv2.weight: got (16, 16, 5, 5), "
            "expected (16, 16, 3, 3)") in message


def test_convert_with_the_wrong_config_names_the_shapes():
    state_dict, _, _, _, _ = load_case("mnist_mlp")
    with pytest.raises(ValueError, match=r"fc1\.weight: got \(128, 784\), expected \(32, 784\)"):
        convert(state_dict, "mnist_mlp", hidden=(32, 64))
    with pytest.raises(ValueError, match="unknown arch"):
        convert(state_dict, "resnet18")
    with pytest.raises(TypeError):
        convert(state_dict, "mnist_mlp", n_layer=3)


def test_buffers_without_parameters_are_skipped():
    # num_batches_tracked (ResNet-9) and the sinusoidal table (Music Transformer) are in
    # the files and are not reported as unexpected.
    assert any(k.endswith("num_batches_tracked") for k in load_case("resnet9")[0])
    assert "positional_encoding.pe" in load_case("music_transformer")[0]


@pytest.mark.parametrize("case", ["mnist_mlp", "nanogpt", "resnet9"])
def test_dropout_is_keyed_and_off_by_default(case):
    state_dict, arch, config, x, expected = load_case(case)
    config = dict(config, **{"dropout" if arch == "nanogpt" else "dropout_rate": 0.3})
    variables = convert(state_dict, arch, **config)
    apply = jitted_apply(arch, config)
    x = jnp.asarray(x)
    drop = lambda key: np.asarray(apply(variables, x, key))
    # rbg keys: the same Flax dropout, a fraction of threefry's compile time.
    key = lambda seed: jax.random.key(seed, impl="rbg")
    a, b = drop(key(1)), drop(key(2))
    np.testing.assert_array_equal(a, drop(key(1)))
    assert not np.allclose(a, b)
    assert not np.allclose(a, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(apply(variables, x)), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("arch, n_params", [
    # PyTorch's parameter counts of dattri's benchmark models (tied embeddings once).
    ("mnist_lr", 7_850), ("mnist_mlp", 109_386), ("resnet9", 4_825_154),
    ("nanogpt", 10_745_088), ("music_transformer", 13_115_782), ("gpt2", 124_439_808)])
def test_default_configs_are_the_benchmark_models(arch, n_params):
    variables = jax.eval_shape(build(arch).init, jax.random.key(0))
    assert sum(leaf.size for leaf in jax.tree.leaves(variables["params"])) == n_params
