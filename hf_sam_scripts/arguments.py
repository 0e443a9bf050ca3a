"""Argument dataclasses that every training script shares (plain dataclasses: no heavy imports).

A script's own `ScriptArguments` subclasses `CommonArguments` (and `TextFileArguments` when it reads
text files) and adds what only it needs; a field it redeclares (`model_name_or_path`, whose default
and help differ per script) keeps its place.
"""

from dataclasses import dataclass, field


@dataclass
class CommonArguments:
    """Settings of every training script: where the model and the data come from, sample caps, output."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pretrained model: a Hub id, a local folder, or package:<module>/<folder> (weights shipped by an "
                "installed Python package). Default: the script's model built from a config."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "Hub dataset id. Default: the script's offline dataset."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    split_seed: int = field(default=42, metadata={"help": "Seed of the train/validation/test split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Keep only the first N held-out (validation and test) examples."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start over in an output_dir that already holds checkpoints of another run."})
    torch_threads: int | None = field(default=None, metadata={
        "help": "CPU threads per process for torch. Default: chosen from the cores this process may use, the "
                "load average and the processes of the launch (hf_sam_scripts.threads.choose_threads)."})


@dataclass
class TextFileArguments:
    """Local text files (hf_sam_scripts.data.load_text_data)."""

    train_file: str | None = field(default=None, metadata={
        "help": "Local training data: .txt (one example per paragraph), or .json/.jsonl/.csv with a text column."})
    validation_file: str | None = field(default=None, metadata={"help": "Local held-out data, same format."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})


@dataclass
class LoraArguments:
    """LoRA through PEFT. `lora_r: 0` (the default) trains the full model."""

    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 turns LoRA off (full fine-tuning)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names (or suffixes) that get LoRA adapters; default: the "
                                        "script's choice for the model (q_proj v_proj for ViT, query value "
                                        "for BERT, c_attn for GPT-2)."})
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full next to the adapters (e.g. a new classifier "
                                        "head); default: the script's choice (the task head)."})


@dataclass
class LabelNoiseArguments:
    """Symmetric label noise on the training and validation labels of a classification script (for studies of
    noisy labels, where SAM is known to help); the test labels stay clean."""

    label_noise: float = field(default=0.0, metadata={
        "help": "Share of the train and validation labels replaced by a uniformly drawn different class "
                "(exactly round(p * n) of them); 0 (default) keeps the labels. A number in [0, 1)."})
    label_noise_seed: int = field(default=0, metadata={"help": "Seed of the label-noise draw."})

    def __post_init__(self):
        from .errors import ConfigError

        if not 0.0 <= self.label_noise < 1.0:
            raise ConfigError(f"label_noise={self.label_noise!r}: use a number in [0, 1).")
