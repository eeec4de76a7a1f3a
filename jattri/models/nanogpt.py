"""nanoGPT, the GPT of dattri's Shakespeare benchmark (Flax linen).

A decoder-only transformer (Radford et al., 2019, "Language Models are Unsupervised
Multitask Learners") as written in Karpathy's nanoGPT ``model.py``: learned token and
position embeddings, pre-LayerNorm blocks of causal self-attention and a GELU MLP, a final
LayerNorm, and an output head tied to the token embedding. Parameter names follow the
reference (``wte``, ``wpe``, ``h_<i>`` = ``transformer.h.<i>``, ``ln_1``, ``attn.c_attn``
(fused q, k, v), ``attn.c_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``, ``ln_f``).

Unlike the reference's inference path, which returns logits for the last position only,
``__call__`` returns logits for every position (what a per-token loss needs).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def _layer_norm(bias: bool, name: str) -> nn.LayerNorm:
    # Two-pass variance like PyTorch's layer_norm; the one-pass E[x²]-E[x]² loses digits.
    return nn.LayerNorm(epsilon=1e-5, use_bias=bias, use_fast_variance=False, name=name)


def causal_attention(q, k, v, dropout: nn.Dropout, deterministic: bool):
    """softmax(q kᵀ / √d + causal mask) v per head: ``(..., H, T, d) -> (..., H, T, d)``."""
    t = q.shape[-2]
    logits = q @ jnp.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal, logits, -jnp.inf)
    probs = dropout(jax.nn.softmax(logits, axis=-1), deterministic=deterministic)
    return probs @ v


def split_heads(x, n_head: int):
    """``(..., T, H·d) -> (..., H, T, d)``."""
    x = x.reshape(x.shape[:-1] + (n_head, x.shape[-1] // n_head))
    return jnp.swapaxes(x, -2, -3)


def merge_heads(x):
    """``(..., H, T, d) -> (..., T, H·d)``."""
    x = jnp.swapaxes(x, -2, -3)
    return x.reshape(x.shape[:-2] + (-1,))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused q/k/v projection ``c_attn``."""

    n_head: int
    bias: bool = True
    dropout: float = 0.0
    proj_init_std: float = 0.02

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
        c = x.shape[-1]
        if c % self.n_head:
            raise ValueError(f"n_embd={c} is not divisible by n_head={self.n_head}")
        init = nn.initializers.normal(0.02)
        qkv = nn.Dense(3 * c, use_bias=self.bias, kernel_init=init, name="c_attn")(x)
        q, k, v = (split_heads(a, self.n_head) for a in jnp.split(qkv, 3, axis=-1))
        y = merge_heads(causal_attention(q, k, v, nn.Dropout(self.dropout), deterministic))
        y = nn.Dense(c, use_bias=self.bias, kernel_init=nn.initializers.normal(
            self.proj_init_std), name="c_proj")(y)
        return nn.Dropout(self.dropout)(y, deterministic=deterministic)


class FeedForward(nn.Module):
    """``c_fc`` (4x wider) - GELU - ``c_proj`` - dropout (the reference's ``MLP``)."""

    bias: bool = True
    dropout: float = 0.0
    approximate_gelu: bool = False
    proj_init_std: float = 0.02

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
        c = x.shape[-1]
        h = nn.Dense(4 * c, use_bias=self.bias, kernel_init=nn.initializers.normal(0.02),
                     name="c_fc")(x)
        h = jax.nn.gelu(h, approximate=self.approximate_gelu)
        h = nn.Dense(c, use_bias=self.bias, kernel_init=nn.initializers.normal(
            self.proj_init_std), name="c_proj")(h)
        return nn.Dropout(self.dropout)(h, deterministic=deterministic)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    n_head: int
    bias: bool = True
    dropout: float = 0.0
    approximate_gelu: bool = False
    proj_init_std: float = 0.02

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True):
        x = x + CausalSelfAttention(self.n_head, self.bias, self.dropout, self.proj_init_std,
                                    name="attn")(_layer_norm(self.bias, "ln_1")(x),
                                                 deterministic=deterministic)
        x = x + FeedForward(self.bias, self.dropout, self.approximate_gelu,
                            self.proj_init_std, name="mlp")(_layer_norm(self.bias, "ln_2")(x),
                                                            deterministic=deterministic)
        return x


class NanoGPT(nn.Module):
    """``tokens (..., T) int -> logits (..., T, vocab_size)``, ``T <= block_size``.

    Defaults are dattri's Shakespeare-char model (65 characters, 256 context, 6 layers,
    6 heads, 384 wide, no biases, dropout 0.2 when ``deterministic=False``); exact GELU.
    ``approximate_gelu=True`` gives GPT-2's tanh GELU (see ``jattri.models.GPT2``).
    """

    vocab_size: int = 65
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    bias: bool = False
    approximate_gelu: bool = False

    @nn.compact
    def __call__(self, tokens, *, deterministic: bool = True):
        t = tokens.shape[-1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size={self.block_size}")
        init = nn.initializers.normal(0.02)
        wte = nn.Embed(self.vocab_size, self.n_embd, embedding_init=init, name="wte")
        wpe = nn.Embed(self.block_size, self.n_embd, embedding_init=init, name="wpe")
        x = wte(tokens) + wpe(jnp.arange(t))
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        # GPT-2's scaled init of the residual projections (reference _init_weights).
        proj_std = 0.02 / math.sqrt(2 * self.n_layer)
        for i in range(self.n_layer):
            x = Block(self.n_head, self.bias, self.dropout, self.approximate_gelu, proj_std,
                      name=f"h_{i}")(x, deterministic=deterministic)
        x = _layer_norm(self.bias, "ln_f")(x)
        return wte.attend(x)  # lm_head tied to wte
