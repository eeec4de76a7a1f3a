"""Write the PyTorch fixtures that tests/test_models_convert.py checks the Flax ports against.

Run by hand, never by the tests (which need no torch). It needs real PyTorch, the
reference model code from dattri, and Hugging Face transformers for GPT-2, ideally in a
throwaway virtual environment so that the test environment stays torch-free:

    python -m venv --system-site-packages /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0      # the CPU build; no CUDA wheels
    /tmp/torchenv/bin/pip install transformers
    /tmp/torchenv/bin/pip install --no-deps dattri   # model code only
    /tmp/torchenv/bin/python tests/make_model_fixtures.py

For every case it builds a small instance of a dattri benchmark architecture (same
parameter names as the published checkpoints, reduced widths and depths), re-draws every
parameter and BatchNorm statistic from a fixed seed so that nothing sits at its init
value (ones, zeros, tiny std), and writes to ``tests/fixtures/models/``:

    <case>.pt       torch.save of the model's state_dict (the nanoGPT case: a nanoGPT
                    training checkpoint {"model": state_dict with torch.compile's
                    "_orig_mod." prefix, "model_args": ..., "iter_num": ...})
    <case>_io.npz   ``x``: the inputs, ``logits``: the eval-mode PyTorch outputs (float32)
    manifest.json   {case: {"arch": ..., "config": ...}}: the arguments of
                    jattri.models.build / jattri.interop.convert for that case
"""
from __future__ import annotations

import json
import math
import pathlib
import sys
import types

import numpy as np
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

OUT = pathlib.Path(__file__).parent / "fixtures" / "models"


class _NoMidi(types.ModuleType):
    """Stand-in for ``pretty_midi``: dattri's Music Transformer imports it for type hints only."""

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return object


sys.modules.setdefault("pretty_midi", _NoMidi("pretty_midi"))

from dattri.benchmark.models.logistic_regression.logistic_regression import (  # noqa: E402
    LogisticRegressionMnist)
from dattri.benchmark.models.mlp.mlp import MLPMnist  # noqa: E402
from dattri.benchmark.models.MusicTransformer.music_transformer import (  # noqa: E402
    MusicTransformer)
from dattri.benchmark.models.MusicTransformer.utilities.constants import (  # noqa: E402
    VOCAB_SIZE)
from dattri.benchmark.models.nanoGPT.model import GPT, GPTConfig  # noqa: E402
from dattri.benchmark.models.resnet9.resnet9 import BasicBlock, ResNet9  # noqa: E402

if isinstance(sys.modules.get("pretty_midi"), _NoMidi):
    del sys.modules["pretty_midi"]


def randomize(model: nn.Module, seed: int) -> None:
    """Re-draw parameters and BatchNorm statistics so that a layout error cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):          # norm scales
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:                                    # biases
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith("num_batches_tracked"):
                b.fill_(17)


class SmallResNet9(ResNet9):
    """dattri's ResNet9 (its ``forward`` and ``BasicBlock``) with configurable widths."""

    def __init__(self, widths, num_classes=2):
        nn.Module.__init__(self)
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.dropout1 = nn.Dropout(0.1)
        self.layer1 = self._make_layer(BasicBlock, widths[1], 1, stride=1, dropout_rate=0.1)
        self.layer2 = self._make_layer(BasicBlock, widths[2], 1, stride=2, dropout_rate=0.1)
        self.layer3 = self._make_layer(BasicBlock, widths[3], 1, stride=2, dropout_rate=0.1)
        self.linear = nn.Linear(widths[3], num_classes)


def case_mnist_lr(g):
    model = LogisticRegressionMnist()
    x = torch.randn(4, 1, 28, 28, generator=g)          # raw images, flattened by the model
    return model, x, model, {"input_shape": [1, 28, 28]}


def case_mnist_mlp(g):
    model = MLPMnist()
    x = torch.randn(4, 784, generator=g)
    return model, x, model, {}


def _resnet(widths, size):
    def case(g):
        model = SmallResNet9(widths)
        x = torch.randn(3, 3, size, size, generator=g)
        return model, x, model, {"widths": list(widths), "image_size": size}
    return case


def _nanogpt(bias):
    def case(g):
        config = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=16,
                      dropout=0.0, bias=bias)
        model = GPT(GPTConfig(**config))
        x = torch.randint(0, 65, (3, 12), generator=g)
        forward = lambda idx: model(idx, targets=torch.zeros_like(idx))[0]  # all positions
        return model, x, forward, config
    return case


def _music_transformer(rpr):
    def case(g):
        config = dict(n_layers=2, num_heads=2, d_model=16, dim_feedforward=32, dropout=0.1,
                      max_sequence=16, rpr=rpr)
        model = MusicTransformer(**config, device="cpu")
        x = torch.randint(0, VOCAB_SIZE, (2, 12), generator=g)  # shorter than max_sequence
        return model, x, model, config
    return case


def case_gpt2(g):
    hf = GPT2Config(vocab_size=97, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                    bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(hf)
    x = torch.randint(0, 97, (2, 10), generator=g)
    forward = lambda idx: model(input_ids=idx).logits
    return model, x, forward, {"vocab_size": 97, "block_size": 16, "n_layer": 2,
                               "n_head": 2, "n_embd": 16}


CASES = {
    "mnist_lr": ("mnist_lr", case_mnist_lr),
    "mnist_mlp": ("mnist_mlp", case_mnist_mlp),
    "resnet9": ("resnet9", _resnet((8, 16, 16, 32), 12)),
    "resnet9_identity": ("resnet9", _resnet((8, 8, 16, 24), 9)),   # identity shortcut, odd size
    "nanogpt": ("nanogpt", _nanogpt(bias=False)),
    "nanogpt_bias": ("nanogpt", _nanogpt(bias=True)),
    "music_transformer": ("music_transformer", _music_transformer(rpr=True)),
    "music_transformer_norpr": ("music_transformer", _music_transformer(rpr=False)),
    "gpt2": ("gpt2", case_gpt2),
}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for seed, (case, (arch, make)) in enumerate(CASES.items()):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(1000 + seed)
        model, x, forward, config = make(g)
        randomize(model, seed)
        model.eval()
        with torch.no_grad():
            logits = forward(x)
        state_dict = model.state_dict()
        if case == "nanogpt":
            saved = {"model": {"_orig_mod." + k: v for k, v in state_dict.items()},
                     "model_args": config, "iter_num": 5000,
                     "best_val_loss": torch.tensor(1.5)}
        else:
            saved = state_dict
        torch.save(saved, OUT / f"{case}.pt")
        np.savez(OUT / f"{case}_io.npz", x=x.numpy(), logits=logits.numpy().astype(np.float32))
        manifest[case] = {"arch": arch, "config": config}
        print(f"{case:26s} {arch:18s} logits {tuple(logits.shape)} "
              f"|logits|max {logits.abs().max():.3g}")
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
