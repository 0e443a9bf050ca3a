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
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for _common when run as a script

import numpy as np
import torch
from transformers import set_seed

from _common import (
    ConfigError,
    DataError,
    LoraArguments,
    ScriptParser,
    apply_lora,
    attach_sharpness,
    check_launch,
    checkpoint_to_resume,
    encode_labels,
    finetuned_from,
    finish_run,
    rank_zero_print,
    reproduce_command,
    require_columns,
    resolve_model_path,
    run_main,
    split_train_validation_test,
    take,
)

from hf_sam import SAMTrainer, SAMTrainingArguments
from hf_sam.metrics import load_metric

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "vit_digits.yaml")


@dataclass
class ScriptArguments:
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
    # --- data: a Hub dataset, an image folder, or (default) sklearn's digits ---
    dataset_name: str | None = field(default=None, metadata={
        "help": "Hub dataset id (e.g. cifar10, food101). Default: scikit-learn's bundled 8x8 digits."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_dir: str | None = field(default=None, metadata={
        "help": "Local image folder (one subfolder per class, optionally inside train/ validation/ test/)."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class labels."})
    validation_fraction: float = field(default=0.15, metadata={
        "help": "Share of train held out for validation when the dataset has no validation split."})
    test_fraction: float = field(default=0.15, metadata={
        "help": "Share of train held out for the final test when the dataset has no test split."})
    split_seed: int = field(default=42, metadata={"help": "Seed of the train/validation/test split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Keep only the first N validation and test images."})
    # --- evaluation and output ---
    metric: str = field(default="accuracy", metadata={
        "help": "evaluate metric: 'accuracy' loads hf_sam's bundled copy (offline); a Hub id or a path otherwise."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start over in an output_dir that already holds checkpoints of another run."})
    torch_threads: int | None = field(default=None, metadata={
        "help": "CPU threads per process for torch (torch.set_num_threads); default: torch's choice. "
                "Tiny models train faster on 1 thread, especially on a busy machine."})


def main(argv=None):
    """Train, evaluate and save. Returns (trainer, metrics) for notebooks and tests."""
    # -------------------------------------------------------------------------
    # 1. Settings: dataclass defaults < --config file.yaml < command-line flags.
    #    Without --config the default job's file is read (DEFAULT_CONFIG); `--config none` skips it.
    parser = ScriptParser((ScriptArguments, LoraArguments, SAMTrainingArguments), description=__doc__,
                          default_config=DEFAULT_CONFIG)
    script_args, lora_args, training_args = parser.parse_args_and_config(argv)
    if script_args.dataset_name and script_args.train_dir:
        raise ConfigError("give either --dataset_name or --train_dir, not both.")
    check_launch(training_args)
    resume = checkpoint_to_resume(training_args, script_args.overwrite_output_dir)
    # The transforms below produce pixel_values on the fly from the image column, which the Trainer
    # would otherwise drop as "unused" before the transform ever sees it.
    training_args.remove_unused_columns = False
    if script_args.torch_threads:
        torch.set_num_threads(script_args.torch_threads)
    set_seed(training_args.seed)

    # -------------------------------------------------------------------------
    # 2. Data: a DatasetDict with train / validation / test splits, labels as a ClassLabel.
    splits, source = load_image_data(script_args)
    for name in splits:
        require_columns(splits[name], [(script_args.image_column, "image_column"),
                                       (script_args.label_column, "label_column")], f"{source} ({name} split)")
    splits = encode_labels(splits, script_args.label_column, source)
    splits = split_train_validation_test(splits, script_args.validation_fraction, script_args.test_fraction,
                                         seed=script_args.split_seed, stratify=script_args.label_column)
    splits["train"] = take(splits["train"], script_args.max_train_samples)
    for name in ("validation", "test"):
        splits[name] = take(splits[name], script_args.max_eval_samples)
    labels = splits["train"].features[script_args.label_column].names
    rank_zero_print(f"data: {source}: {len(labels)} classes; "
                    + ", ".join(f"{name} {len(ds)}" for name, ds in splits.items()))

    # -------------------------------------------------------------------------
    # 3. Model and image processor.
    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    model, processor = build_model_and_processor(script_args, id2label, label2id)
    model = apply_lora(model, lora_args, task_type=None,
                       default_targets=[["q_proj", "v_proj"], ["query", "value"]],
                       default_modules_to_save=["classifier"])
    if lora_args.lora_r > 0 and training_args.label_names is None:
        training_args.label_names = ["labels"]  # a PeftModel's forward hides the label argument from the Trainer

    # -------------------------------------------------------------------------
    # 4. Transforms: images -> pixel_values with the model's own processor, applied per batch.
    mode = "L" if getattr(model.config, "num_channels", 3) == 1 else "RGB"
    image_column, label_column = script_args.image_column, script_args.label_column

    def transform(batch):
        images = [image.convert(mode) for image in batch[image_column]]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": torch.tensor(batch[label_column])}

    for ds in splits.values():
        ds.set_transform(transform)

    def collate(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.stack([e["labels"] for e in examples])}

    # -------------------------------------------------------------------------
    # 5. Metric: accuracy through `evaluate`, from the local module unless told otherwise.
    metric = load_metric(script_args.metric)

    def compute_metrics(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=prediction.label_ids)

    # -------------------------------------------------------------------------
    # 6. Train with SAM. Checkpoints go to output_dir as configured (save_strategy).
    trainer = SAMTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        data_collator=collate,
        compute_metrics=compute_metrics,
        processing_class=processor,
    )
    trainer.sam_reproduce_command = reproduce_command(__file__, parser.effective_argv)
    attach_sharpness(trainer, parser)  # --sam_measure: sharpness/* logged at every evaluation
    train_result = trainer.train(resume_from_checkpoint=resume)

    # -------------------------------------------------------------------------
    # 7. Evaluate on validation and test, save model + metrics + model card, push if asked.
    metrics = {"train": train_result.metrics,
               "eval": trainer.evaluate(),
               "test": trainer.predict(splits["test"], metric_key_prefix="test").metrics}
    finish_run(trainer, metrics, tasks="image-classification", dataset=source,
               finetuned_from=finetuned_from(script_args.model_name_or_path))
    rank_zero_print(f"test accuracy: {metrics['test'].get('test_accuracy', float('nan')):.4f}  "
                    f"(validation {metrics['eval'].get('eval_accuracy', float('nan')):.4f}; "
                    f"model, metrics and card in {training_args.output_dir})")
    return trainer, metrics


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
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    data = {"image": [PILImage.fromarray(p) for p in pixels], "label": digits.target.tolist()}
    return DatasetDict(train=Dataset.from_dict(data, features=features))


def build_model_and_processor(args, id2label, label2id):
    """A pretrained classifier with a fresh head for our labels, or a small ViT built from scratch."""
    from transformers import (AutoImageProcessor, AutoModelForImageClassification, ViTConfig,
                              ViTForImageClassification, ViTImageProcessor)

    if args.model_name_or_path is None:
        if args.image_size % args.patch_size:
            raise ConfigError(f"image_size={args.image_size} must be a multiple of patch_size={args.patch_size}.")
        if args.hidden_size % args.num_attention_heads:
            raise ConfigError(f"hidden_size={args.hidden_size} must be a multiple of "
                              f"num_attention_heads={args.num_attention_heads}.")
        config = ViTConfig(image_size=args.image_size, patch_size=args.patch_size, num_channels=3,
                           hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                           num_attention_heads=args.num_attention_heads, intermediate_size=args.intermediate_size,
                           num_labels=len(id2label), id2label=id2label, label2id=label2id)
        processor = ViTImageProcessor(do_resize=True, size={"height": args.image_size, "width": args.image_size},
                                      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        return ViTForImageClassification(config), processor

    path = resolve_model_path(args.model_name_or_path)
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
    run_main(main)
