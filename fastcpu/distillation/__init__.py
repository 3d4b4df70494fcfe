"""The `distillation` config group: the objective the student trains on (see base.py). One module per
term: `logit_kd` (logits.py) and `tinybert` (tinybert.py: hidden states, attentions, embeddings).

Adding a term is a module here (a `TermConfig` subclass and a `DistillationTerm` registered in `TERMS`)
plus its YAML file in `conf/distillation/`.
"""

from .base import TERMS, DistillationConfig, DistillationTerm, Distiller, TermConfig, build_distillation
from .logits import LogitDistillation, LogitDistiller, kd_loss
from .tinybert import TinyBertDistillation, TinyBertDistiller, uniform_layer_map

__all__ = [
    "TERMS",
    "DistillationConfig",
    "DistillationTerm",
    "Distiller",
    "LogitDistillation",
    "LogitDistiller",
    "TermConfig",
    "TinyBertDistillation",
    "TinyBertDistiller",
    "build_distillation",
    "kd_loss",
    "uniform_layer_map",
]
