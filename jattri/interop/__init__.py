"""Interoperability with PyTorch checkpoints, without torch.

``load_pt(path)`` reads a ``torch.save`` file into numpy arrays through an allow-list
unpickler (no code from the file runs; other globals raise ``UnsafePickleError``), within
a byte budget proportional to the file's size (beyond it: ``ExpansionLimitError``).
"""
from jattri.interop.convert import convert
from jattri.interop.pt import load_pt
from jattri.interop.unpickle import CorruptFileError, ExpansionLimitError, UnsafePickleError

__all__ = ["CorruptFileError", "ExpansionLimitError", "UnsafePickleError", "convert",
           "load_pt"]
