"""Image classification with a Vision Transformer, trained by hf_sam's SAMTrainer.

Its default job (configs/vit_digits.yaml, read when no --config is given) trains a small ViT (32 px
images, 8 px patches, 2 layers of width 64) from scratch with SAM on scikit-learn's bundled 8x8
handwritten digits, upscaled: no network needed, under a minute on 2 CPU cores, and it prints the
test accuracy at the end.

    python scripts/train_vit.py                                     # = --config configs/vit_digits.yaml
    python scripts/train_vit.py --config configs/vit_digits.yaml --sam_rho 0.1 --output_dir runs/rho0.1
    python scripts/train_vit.py --config configs/vit_digits.yaml --sam_rho 0 --output_dir runs/no_sam
    python scripts/train_vit.py --train_dir path/to/imagefolder     # class-named subfolders of images
    python scripts/train_vit.py --config configs/hub/vit_base_cifar10.yaml   # needs network and a GPU
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml scripts/train_vit.py --config ...

Every flag of `SAMTrainingArguments` works (`--sam_variant`, `--sam_rho`, `--learning_rate`, ...),
LoRA through `--lora_r 8` (PEFT), and `--config file.yaml` sets defaults that flags override.
"""

import os
from dataclasses import dataclass, field

from hf_sam_scripts.arguments import CommonArguments, LabelNoiseArguments, LoraArguments
from hf_sam_scripts.cli import SAM_TRAINING_ARGUMENTS, parse_script_args
from hf_sam_scripts.data import classification_splits
from hf_sam_scripts.errors import ConfigError, DataError, run_main
from hf_sam_scripts.models import apply_lora, finetuned_from, resolve_model_path
from hf_sam_scripts.run import accuracy_metrics, prepare_run, rank_zero_print, train_and_finish

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "vit_digits.yaml")


@dataclass
class ScriptArguments(LabelNoiseArguments, CommonArguments):
    # --- model: a Hub id / local folder, or (default) a small ViT built from these sizes ---
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pretrained image classifier: a Hub id (google/vit-base-patch16-224-in21k), a local folder, or "
                "package:<module>/<folder>. Default: a small ViT built from the sizes below."})
    image_size: int = field(default=32, metadata={"help": "Built ViT: input resolution in pixels."})
    patch_size: int = field(default=8, metadata={"help": "Built ViT: patch size in pixels."})
    hidden_size: int = field(default=64, metadata={"help": "Built ViT: width."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Built ViT: number of transformer blocks."})
    num_attention_heads: int = field(default=4, metadata={"help": "Built ViT: attention heads per block."})
    intermediate_size: int = field(default=128, metadata={"help": "Built ViT: MLP hidden size."})
    # --- data: a Hub dataset (--dataset_name, e.g. cifar10), an image folder, or (default) sklearn's digits ---
    train_dir: str | None = field(default=None, metadata={
        "help": "Local image folder (one subfolder per class, optionally inside train/ validation/ test/)."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class labels."})
    validation_fraction: float = field(default=0.15, metadata={
        "help": "Share of train held out for validation when the dataset has no validation split."})
    test_fraction: float = field(default=0.15, metadata={
        "help": "Share of train held out for the final test when the dataset has no test split."})
    metric: str = field(default="accuracy", metadata={
        "help": "evaluate metric: 'accuracy' loads hf_sam's bundled copy (offline); a Hub id or a path otherwise."})


def parse_args(argv=None):
    """(script_args, lora_args, training_args, reproduce command): defaults < --config < flags."""
    return parse_script_args(__file__, __doc__, [(ScriptArguments, "train_vit.py settings"),
                                                 (LoraArguments, "LoRA (PEFT)")],
                             SAM_TRAINING_ARGUMENTS, DEFAULT_CONFIG, argv)


def main(script_args, lora_args, training_args, command=None):
    """Train, evaluate and save. Returns (trainer, metrics) for notebooks and tests."""
    from hf_sam import SAMTrainer

    # 1. Checks that need no data; threads, seed. The transforms below make pixel_values on the fly
    #    from the image column, which the Trainer would otherwise drop as "unused" first.
    if script_args.dataset_name and script_args.train_dir:
        raise ConfigError("give either --dataset_name or --train_dir, not both.")
    resume = prepare_run(script_args, training_args)
    training_args.remove_unused_columns = False

    # 2. Data: train / validation / test splits, labels as a ClassLabel.
    splits, source = load_image_data(script_args)
    splits, labels = classification_splits(splits, source, script_args, script_args.image_column, "image_column")

    # 3. Model and image processor (a fresh head for these labels); LoRA when asked.
    path = resolve_model_path(script_args.model_name_or_path)
    model, processor = build_model_and_processor(script_args, path, labels)
    model = apply_lora(model, lora_args, task_type=None, default_targets=[["q_proj", "v_proj"], ["query", "value"]],
                       default_modules_to_save=["classifier"], weights_path=path)
    if lora_args.lora_r > 0 and training_args.label_names is None:
        training_args.label_names = ["labels"]  # a PeftModel's forward hides the label argument from the Trainer

    # 4. Images -> pixel_values with the model's own processor, per batch; train with SAM; test.
    transform, collate = image_transform(model, processor, script_args.image_column, script_args.label_column)
    for ds in splits.values():
        ds.set_transform(transform)
    trainer = SAMTrainer(model=model, args=training_args, train_dataset=splits["train"],
                         eval_dataset=splits["validation"], data_collator=collate,
                         compute_metrics=accuracy_metrics(script_args.metric), processing_class=processor)
    metrics = train_and_finish(trainer, resume, command, script_args.sam_measure, tasks="image-classification",
                               dataset=source, finetuned_from=finetuned_from(script_args.model_name_or_path),
                               test_split=splits["test"])
    rank_zero_print(f"test accuracy: {metrics['test'].get('test_accuracy', float('nan')):.4f}  "
                    f"(validation {metrics['eval'].get('eval_accuracy', float('nan')):.4f}; "
                    f"model, metrics and card in {training_args.output_dir})")
    return trainer, metrics


def run(argv=None):
    """main(*parse_args(argv)): parse and train, for notebooks and tests."""
    return main(*parse_args(argv))


def load_image_data(args):
    """Returns (DatasetDict, a short description of the source)."""
    from datasets import load_dataset

    if args.dataset_name:
        return load_dataset(args.dataset_name, args.dataset_config_name), args.dataset_name
    if args.train_dir:
        if not os.path.isdir(args.train_dir):
            raise DataError(f"--train_dir {args.train_dir} is not a folder.")
        return load_dataset("imagefolder", data_dir=args.train_dir), os.path.basename(os.path.normpath(args.train_dir))
    return digits_dataset(), "sklearn-digits"


def digits_dataset():
    """scikit-learn's 1797 handwritten digits (8x8, 17 grey levels) as 8x8 PIL images in one train split,
    with the columns "image" and "label"."""
    import numpy as np
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    data = {"image": [PILImage.fromarray(p) for p in pixels], "label": digits.target.tolist()}
    return DatasetDict(train=Dataset.from_dict(data, features=features))


def image_transform(model, processor, image_column, label_column):
    """(transform for Dataset.set_transform, data collator): images -> pixel_values, labels -> a tensor."""
    import torch

    mode = "L" if getattr(model.config, "num_channels", 3) == 1 else "RGB"

    def transform(batch):
        images = [image.convert(mode) for image in batch[image_column]]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": torch.tensor(batch[label_column])}

    def collate(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.stack([e["labels"] for e in examples])}

    return transform, collate


def build_model_and_processor(args, path, labels):
    """A pretrained classifier (from `path`) with a fresh head for our labels, or a small ViT built from scratch."""
    import importlib.util

    from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    if path is None:
        if args.image_size % args.patch_size:
            raise ConfigError(f"image_size={args.image_size} must be a multiple of patch_size={args.patch_size}.")
        if args.hidden_size % args.num_attention_heads:
            raise ConfigError(f"hidden_size={args.hidden_size} must be a multiple of "
                              f"num_attention_heads={args.num_attention_heads}.")
        config = ViTConfig(image_size=args.image_size, patch_size=args.patch_size, num_channels=3,
                           hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                           num_attention_heads=args.num_attention_heads, intermediate_size=args.intermediate_size,
                           num_labels=len(id2label), id2label=id2label, label2id=label2id)
        # without torchvision, the PIL processor that ViTImageProcessor falls back to (and warns about)
        if importlib.util.find_spec("torchvision") is None:
            from transformers import ViTImageProcessorPil as processor_class
        else:
            from transformers import ViTImageProcessor as processor_class
        processor = processor_class(do_resize=True, size={"height": args.image_size, "width": args.image_size},
                                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        return ViTForImageClassification(config), processor

    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model_name_or_path {args.model_name_or_path}: no image processor found "
                          f"(preprocessor_config.json): {err}") from None
    try:
        model = AutoModelForImageClassification.from_pretrained(
            path, num_labels=len(id2label), id2label=id2label, label2id=label2id,
            ignore_mismatched_sizes=True)  # a new head when the label count differs
    except ValueError as err:
        raise ConfigError(f"model_name_or_path {args.model_name_or_path} is not an image-classification model: "
                          f"{err}") from None
    return model, processor


if __name__ == "__main__":
    run_main(main, parse_args)
