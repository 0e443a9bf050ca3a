"""hf_sam: Sharpness-Aware Minimization and its variants as a drop-in transformers.Trainer."""

from . import sharpness, variants
from .config import SAMConfig, SAMTrainingArguments, with_sam_args
from .optim import SAM
from .sharpness import SharpnessCallback
from .trainer import SAMMixin, SAMTrainer, with_sam
from .variants import available, register

__version__ = "0.2.0.dev0"

__all__ = ["SAM", "SAMConfig", "SAMMixin", "SAMTrainer", "SAMTrainingArguments", "SharpnessCallback", "available",
           "register", "sharpness", "variants", "with_sam", "with_sam_args"]
