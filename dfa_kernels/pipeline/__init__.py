"""Pipeline-parallel DFA: the model split into S stages over S processes (``torch.distributed``).

``Pipeline(model, stages, microbatches, example)`` is one rank's stage (``group=``/``data_group=``
from :func:`pipeline_groups` for pipeline × data parallelism); ``pipe.step(x, t)`` runs one
global batch (DFA's schedule, or BP's GPipe / 1F1B through ``torch.distributed.pipelining``);
:mod:`.parts` says where a model may be cut; :mod:`.simulate` is the event-driven model of the
schedules; :mod:`.train` trains a zoo task (``dfa-kernels train TASK --pipeline S``).
"""

from .engine import DFA_MODES, SCHEDULES, Pipeline, StageSpec, StepStats, pipeline_groups, stage_spec
from .parts import (
    Parts,
    StageModule,
    balanced_cuts,
    lm_loss,
    parts_of,
    sequential_parts,
)

__all__ = [
    "DFA_MODES",
    "SCHEDULES",
    "Parts",
    "Pipeline",
    "StageModule",
    "StageSpec",
    "StepStats",
    "balanced_cuts",
    "lm_loss",
    "parts_of",
    "pipeline_groups",
    "sequential_parts",
    "stage_spec",
]
