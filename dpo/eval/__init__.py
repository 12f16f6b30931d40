"""Held-out evaluation: the before/after metrics of a run and of `python -m dpo.evaluate` (`evaluation`),
and greedy generations scored by a built-in task's reward (`generation`)."""
