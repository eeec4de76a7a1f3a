"""Music Transformer of dattri's MAESTRO benchmark (Flax linen).

Huang et al., 2018, "Music Transformer" (arXiv:1809.04281): a decoder-only stack of
post-LayerNorm transformer encoder layers with relative position representations (Shaw
et al., 2018, arXiv:1803.02155) computed by the memory-efficient "skew" of q·Erᵀ. The
layout is gwinndr's MusicTransformer-Pytorch as shipped in dattri: token embedding (not
scaled) + sinusoidal positions, ``n_layers`` x [self_attn, add, norm1, linear1-ReLU-linear2,
add, norm2], a final ``encoder_norm``, and ``Wout``.

Parameter names: ``embedding``, ``layers_<i>`` (``transformer.encoder.layers.<i>``) with
``self_attn.{in_proj (fused q, k, v), Er, out_proj}``, ``linear1``, ``linear2``, ``norm1``,
``norm2``; ``encoder_norm`` (``transformer.encoder.norm``); ``Wout``.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jattri.models.nanogpt import merge_heads, split_heads

VOCAB_SIZE = 390  # 128 note-on + 128 note-off + 32 velocity + 100 time-shift + END + PAD


def sinusoidal_positions(max_len: int, d_model: int) -> np.ndarray:
    """``pe[p, 2i] = sin(p·w_i)``, ``pe[p, 2i+1] = cos(p·w_i)``, ``w_i = 10000^(-2i/d)``.

    ``(max_len, d_model)`` float32, computed in float32 in the same order as the reference
    so that the positions agree to the last bits.
    """
    position = np.arange(max_len, dtype=np.float32)[:, None]
    div_term = np.exp(np.arange(0, d_model, 2, dtype=np.float32)
                      * np.float32(-math.log(10000.0) / d_model))
    pe = np.zeros((max_len, d_model), np.float32)
    pe[:, 0::2] = np.sin(position * div_term)
    pe[:, 1::2] = np.cos(position * div_term)[:, : d_model // 2]
    return pe


def skew(qe):
    """Relative logits from ``qe[l, m] = q_l · Er[m]`` (Huang et al., 2018, Sec. 3.4.1).

    ``(..., L, L) -> (..., L, L)`` with ``out[l, j] = qe[l, L - 1 - l + j]`` for ``j <= l``
    (relative distance ``j - l``) and 0 above the diagonal: mask, pad one column on the
    left, reshape to ``(L + 1, L)`` and drop the first row — no ``(L, L, d)`` gather.
    """
    length = qe.shape[-1]
    keep = jnp.flip(jnp.triu(jnp.ones((length, length), bool)), axis=0)
    qe = jnp.where(keep, qe, 0.0)
    qe = jnp.pad(qe, [(0, 0)] * (qe.ndim - 1) + [(1, 0)])
    qe = qe.reshape(qe.shape[:-2] + (length + 1, length))
    return qe[..., 1:, :]


class RelativeSelfAttention(nn.Module):
    """Multi-head self-attention with optional relative position embeddings ``Er``.

    ``x (..., L, E) -> (..., L, E)``. Logits are ``q kᵀ/√d + skew(q Erᵀ)`` (q already
    scaled by 1/√d, as in the reference) plus the causal mask; ``Er`` has ``er_len`` rows,
    of which the last ``L`` are used. ``er_len=None`` is plain attention (the reference's
    ``rpr=False``).
    """

    num_heads: int
    dropout: float = 0.1
    er_len: int | None = None

    @nn.compact
    def __call__(self, x, *, causal: bool = True, deterministic: bool = True):
        length, embed = x.shape[-2:]
        if embed % self.num_heads:
            raise ValueError(f"d_model={embed} is not divisible by num_heads={self.num_heads}")
        head_dim = embed // self.num_heads
        qkv = nn.Dense(3 * embed, kernel_init=nn.initializers.xavier_uniform(),
                       name="in_proj")(x)
        q, k, v = (split_heads(a, self.num_heads) for a in jnp.split(qkv, 3, axis=-1))
        q = q * head_dim ** -0.5
        logits = q @ jnp.swapaxes(k, -1, -2)
        if self.er_len is not None:
            if length > self.er_len:
                raise ValueError(f"sequence length {length} exceeds max_sequence={self.er_len}")
            er = self.param("Er", nn.initializers.uniform(1.0), (self.er_len, head_dim))
            logits = logits + skew(q @ er[self.er_len - length:].T)
        if causal:
            logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, -jnp.inf)
        probs = nn.Dropout(self.dropout)(jax.nn.softmax(logits, axis=-1),
                                         deterministic=deterministic)
        return nn.Dense(embed, name="out_proj")(merge_heads(probs @ v))


class EncoderLayer(nn.Module):
    """Post-LN layer: ``x = norm1(x + attn(x))``; ``x = norm2(x + linear2(relu(linear1(x))))``."""

    num_heads: int
    dim_feedforward: int
    dropout: float = 0.1
    er_len: int | None = None

    @nn.compact
    def __call__(self, x, *, causal: bool = True, deterministic: bool = True):
        drop = lambda h: nn.Dropout(self.dropout)(h, deterministic=deterministic)
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)
        attn = RelativeSelfAttention(self.num_heads, self.dropout, self.er_len, name="self_attn")
        x = norm("norm1")(x + drop(attn(x, causal=causal, deterministic=deterministic)))
        h = drop(nn.relu(nn.Dense(self.dim_feedforward, name="linear1")(x)))
        h = nn.Dense(x.shape[-1], name="linear2")(h)
        return norm("norm2")(x + drop(h))


class MusicTransformer(nn.Module):
    """``tokens (..., L) int -> logits (..., L, vocab_size)``, ``L <= max_sequence``.

    Defaults are dattri's MAESTRO model (6 layers, 8 heads, d_model 512, feed-forward 1024,
    dropout 0.1, max_sequence 256, relative attention). ``causal=False`` drops the mask
    (the reference's ``forward(x, mask=False)``).
    """

    vocab_size: int = VOCAB_SIZE
    n_layers: int = 6
    num_heads: int = 8
    d_model: int = 512
    dim_feedforward: int = 1024
    dropout: float = 0.1
    max_sequence: int = 256
    rpr: bool = True

    @nn.compact
    def __call__(self, tokens, *, causal: bool = True, deterministic: bool = True):
        length = tokens.shape[-1]
        if length > self.max_sequence:
            raise ValueError(f"sequence length {length} exceeds max_sequence={self.max_sequence}")
        x = nn.Embed(self.vocab_size, self.d_model, name="embedding")(tokens)
        x = x + sinusoidal_positions(self.max_sequence, self.d_model)[:length]
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        for i in range(self.n_layers):
            x = EncoderLayer(self.num_heads, self.dim_feedforward, self.dropout,
                             self.max_sequence if self.rpr else None, name=f"layers_{i}")(
                x, causal=causal, deterministic=deterministic)
        x = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="encoder_norm")(x)
        return nn.Dense(self.vocab_size, name="Wout")(x)
