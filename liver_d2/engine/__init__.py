"""Training and evaluation: the Trainer, its hooks and weight loading."""
from liver_d2.engine.trainer import Trainer

__all__ = ["Trainer"]
