"""Flax ports of the benchmark architectures."""
from jattri.models.cnn import SmallCNN
from jattri.models.gpt2 import GPT2
from jattri.models.mlp import MLP, LogisticRegression
from jattri.models.music_transformer import MusicTransformer
from jattri.models.nanogpt import NanoGPT
from jattri.models.registry import ARCHS, Model, build
from jattri.models.resnet9 import ResNet9

__all__ = ["ARCHS", "GPT2", "LogisticRegression", "MLP", "Model", "MusicTransformer",
           "NanoGPT", "ResNet9", "SmallCNN", "build"]
