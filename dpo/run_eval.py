"""Kept only so that `dpo.train` imports unchanged until it is rewired: use dpo.evaluation.Evaluation."""

from dpo.evaluation import Evaluation as RunEvaluation

__all__ = ["RunEvaluation"]
