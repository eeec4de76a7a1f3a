"""Ensembles (Deng et al., 2024, "Efficient Ensembles Improve Training Data
Attribution"): every ensemble is a :class:`jattri.Task` (its functions) and
:class:`jattri.Members` (its arrays), which any method averages over inside one
compiled program: ``attr = method(task); attr.cache(members, train)``.

* :func:`independent`: K independently trained models (the naive ensemble).
* :func:`dropout`: one model, K dropout masks (``mode="member"`` or ``"example"``);
  the mask keys are the members' ``aux``, the model is stored once.
* :func:`dropout_trak`: TRAK with only its Q term averaged over dropout masks.
* :func:`lora`: one base model, K low-rank adapters; the adapters are the members'
  params (gradients w.r.t. adapters only), the base their ``aux``.

Constructors that train report an :class:`EnsembleCosts` (training seconds, bytes
stored; serving seconds are measured per method with :func:`timed`).
"""
from jattri.ensemble.dropout import dropout, dropout_q, dropout_trak
from jattri.ensemble.lora import lora
from jattri.ensemble.members import EnsembleCosts, independent, param_bytes, timed

__all__ = ["EnsembleCosts", "dropout", "dropout_q", "dropout_trak", "independent", "lora",
           "param_bytes", "timed"]
