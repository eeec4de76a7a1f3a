"""GPT-2 small as in Hugging Face's ``GPT2LMHeadModel`` (dattri's wikitext-2 benchmark).

The architecture is nanoGPT's (Radford et al., 2019): nanoGPT was written to load these
weights. What differs is the GELU (GPT-2 uses the tanh approximation, ``gelu_new``),
biases everywhere, and the defaults. The checkpoint layout differs too: HF stores its
``Conv1D`` weights as ``(in, out)``, already Flax's kernel layout; ``jattri.interop.convert``
handles that with ``arch="gpt2"``.
"""
from __future__ import annotations

from jattri.models.nanogpt import NanoGPT


class GPT2(NanoGPT):
    """``tokens (..., T) int -> logits (..., T, vocab_size)``; GPT-2 small by default.

    ``block_size`` is HF's ``n_positions``; ``dropout`` is used for HF's ``embd_pdrop``,
    ``attn_pdrop`` and ``resid_pdrop`` alike (all 0.1 in GPT-2).
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.1
    bias: bool = True
    approximate_gelu: bool = True
