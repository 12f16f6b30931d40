"""dpo: Direct Preference Optimization written out, proven equal to TRL's DPOTrainer."""

__version__ = "0.1.0"
