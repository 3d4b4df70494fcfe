"""The `pruning` config group: one module per method, each a `Pruner` registered with its config class.

- `none` (base.py): the student stays dense;
- `magnitude` (magnitude.py): gradual pruning of single weights or 4x1 blocks by their magnitude;
- `movement` (movement.py): the same schedule, units scored by how training moves them (Sanh et al.):
  accumulated scores and top-k (`hard`) or learned scores over a threshold (`soft`);
- `reconstruct` (reconstruct.py): one step, the kept weights solved to reproduce each Linear's outputs;
- `structured` (structured.py): whole heads and FFN neurons, cut out of the weights at export.

Adding a method is a module here (a config dataclass and a `Pruner` subclass registered in `PRUNERS`)
plus its YAML file in `conf/pruning/`.
"""

from .base import PRUNERS, NoPruning, Pruner, Schedule, make_pruner, sparsity_report
from .magnitude import MagnitudePruner, MagnitudePruning
from .masks import BLOCK, MaskPruner, UnitPruning, magnitude_mask, select_units
from .movement import MovementPruner, MovementPruning, SoftMovementPruner
from .reconstruct import ReconstructPruner, ReconstructPruning, reconstruct
from .structured import StructuredPruner, StructuredPruning

__all__ = [
    "BLOCK",
    "PRUNERS",
    "MagnitudePruner",
    "MagnitudePruning",
    "MaskPruner",
    "MovementPruner",
    "MovementPruning",
    "NoPruning",
    "Pruner",
    "Schedule",
    "SoftMovementPruner",
    "ReconstructPruner",
    "ReconstructPruning",
    "StructuredPruner",
    "StructuredPruning",
    "UnitPruning",
    "magnitude_mask",
    "reconstruct",
    "make_pruner",
    "select_units",
    "sparsity_report",
]
