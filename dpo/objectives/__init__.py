"""The objectives, one module per family over one protocol (`base.Objective`): DPO and its loss types
(`dpo.py`), the reference-free SimPO, CPO and ORPO (`sided.py`), and KTO (`kto.py`).

    objective = objective_for(settings)      # settings: the run's validated LossSettings
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from dpo.loss_settings import LossSettings
from dpo.objectives.base import DataOptions, Objective, Scorer
from dpo.objectives.dpo import PreferenceObjective
from dpo.objectives.kto import KtoObjective
from dpo.objectives.sided import SidedObjective

__all__ = ["DataOptions", "Objective", "Scorer", "objective_for"]

FAMILIES = {"dpo": PreferenceObjective, "simpo": SidedObjective, "cpo": SidedObjective, "orpo": SidedObjective,
            "kto": KtoObjective}


def objective_for(settings: LossSettings, mean_over_ranks: Callable[[Tensor], Tensor] | None = None) -> Objective:
    """The objective these loss settings name; `mean_over_ranks` averages a per-rank scalar over the ranks
    (KTO's KL estimate under data parallelism)."""
    family = FAMILIES[settings.objective]
    return family(settings, mean_over_ranks) if family is KtoObjective else family(settings)
