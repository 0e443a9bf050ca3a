"""hf_sam: Sharpness-Aware Minimization and its variants as a drop-in transformers.Trainer."""

from . import variants
from .config import SAMConfig, SAMTrainingArguments
from .trainer import SAMTrainer
from .variants import available, register

__version__ = "0.1.0"

__all__ = ["SAMConfig", "SAMTrainer", "SAMTrainingArguments", "available", "register", "variants"]
