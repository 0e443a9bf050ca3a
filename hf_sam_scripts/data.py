"""Datasets: the checks and splits every script applies, and the one text loader."""

import os

from .errors import ConfigError, DataError
from .run import rank_zero_print

TEXT_BUILDERS = {"txt": "text", "text": "text", "json": "json", "jsonl": "json", "csv": "csv"}


def load_text_data(args, default):
    """(DatasetDict, a short description of the source) from --dataset_name, --train_file / --validation_file,
    or `default()` (the script's offline dataset, which returns the same pair).

    Local files: .txt (one example per paragraph), .json / .jsonl or .csv; args needs the fields of
    CommonArguments and TextFileArguments.
    """
    from datasets import load_dataset

    if args.dataset_name and args.train_file:
        raise ConfigError("give either --dataset_name or --train_file, not both.")
    if args.dataset_name:
        return load_dataset(args.dataset_name, args.dataset_config_name), args.dataset_name
    if not args.train_file:
        return default()
    files = {"train": args.train_file}
    if args.validation_file:
        files["validation"] = args.validation_file
    for path in files.values():
        if not os.path.isfile(path):
            raise DataError(f"data file {path} does not exist.")
    builder = TEXT_BUILDERS.get(os.path.splitext(args.train_file)[1].lower().lstrip("."))
    if builder is None:
        raise DataError(f"--train_file {args.train_file}: use a .txt, .json, .jsonl or .csv file.")
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    return load_dataset(builder, data_files=files, **kwargs), os.path.basename(args.train_file)


def require_columns(dataset, columns, source):
    """Raise DataError naming each expected column the dataset lacks."""
    have = list(dataset.column_names)
    for name, flag in columns:
        if name not in have:
            raise DataError(f"{source} has no column {name!r} (set with --{flag}); its columns are: "
                            f"{', '.join(have) or 'none'}.")


def encode_labels(splits, label_column, source):
    """Make the label column a ClassLabel: strings or integers -> ids 0..K-1, one mapping for every split."""
    from datasets import ClassLabel

    if isinstance(splits["train"].features[label_column], ClassLabel):
        return splits
    values = sorted({v for ds in splits.values() for v in ds[label_column]}, key=str)
    if len(values) < 2:
        raise DataError(f"{source}: column {label_column!r} holds fewer than 2 distinct labels ({values}).")
    index = {v: i for i, v in enumerate(values)}
    names = [str(v) for v in values]
    return splits.map(lambda b: {label_column: [index[v] for v in b[label_column]]}, batched=True,
                      desc="Encoding labels").cast_column(label_column, ClassLabel(names=names))


def split_train_validation_test(splits, validation_fraction, test_fraction, seed, stratify=None, need_test=True):
    """Make sure `splits` (a DatasetDict) has train, validation (and test) splits.

    Existing splits are kept (a "valid" or "val" split counts as validation); missing ones are carved
    out of train with a fixed seed, stratified by the `stratify` column when it is a ClassLabel.
    """
    from datasets import ClassLabel, DatasetDict

    splits = DatasetDict(dict(splits))
    if "train" not in splits:
        raise DataError(f"the dataset has no 'train' split; its splits are: {', '.join(splits)}.")
    for alias in ("valid", "val", "dev"):
        if "validation" not in splits and alias in splits:
            splits["validation"] = splits.pop(alias)
    wanted = [("validation", validation_fraction)] + ([("test", test_fraction)] if need_test else [])
    carve = [(name, frac) for name, frac in wanted if name not in splits]
    if carve:
        total = sum(frac for _, frac in carve)
        if not 0 < total < 1:
            raise ConfigError(f"validation and test fractions must add up to less than 1, got {total}.")
        by = stratify if stratify and isinstance(splits["train"].features.get(stratify), ClassLabel) else None
        parts = splits["train"].train_test_split(test_size=total, seed=seed, stratify_by_column=by)
        splits["train"], rest = parts["train"], parts["test"]
        if len(carve) == 1:
            splits[carve[0][0]] = rest
        else:  # split the held-out part again into validation and test
            (first, f1), (second, _) = carve
            parts = rest.train_test_split(test_size=1 - f1 / total, seed=seed, stratify_by_column=by)
            splits[first], splits[second] = parts["train"], parts["test"]
    return splits


def symmetric_label_noise(labels, rate, seed, num_classes):
    """Symmetric label noise: exactly round(rate * n) labels, drawn at random, each replaced by a uniformly
    drawn *different* class (numpy, seeded by 10_000 + seed). Returns (noisy labels, flipped mask)."""
    import numpy as np

    labels = np.asarray(labels)
    noisy = labels.copy()
    rng = np.random.default_rng(10_000 + seed)
    n_flip = int(round(rate * len(labels)))
    flip = rng.choice(len(labels), size=n_flip, replace=False)
    noisy[flip] = (labels[flip] + rng.integers(1, num_classes, size=n_flip)) % num_classes
    return noisy, noisy != labels


def add_label_noise(splits, args, label_column, num_classes):
    """args.label_noise > 0: symmetric noise (symmetric_label_noise, seed args.label_noise_seed) on the train and
    validation splits, the data a user holds; the test split keeps its clean labels."""
    if not args.label_noise:
        return splits
    for name in ("train", "validation"):
        ds = splits[name]
        noisy, _ = symmetric_label_noise(ds[label_column], args.label_noise, args.label_noise_seed + (name == "validation"),
                                         num_classes)
        splits[name] = ds.map(lambda _, i: {label_column: int(noisy[i])}, with_indices=True,
                              desc=f"Label noise on {name}")
    return splits


def take(dataset, n):
    """The first n examples (all when n is None)."""
    return dataset if n is None or n >= len(dataset) else dataset.select(range(n))


def classification_splits(splits, source, args, input_column, input_flag, show_labels=False):
    """train / validation / test splits with `input_column` and a ClassLabel `args.label_column`, capped
    by max_train_samples / max_eval_samples. Returns (splits, label names)."""
    for name in splits:
        require_columns(splits[name], [(input_column, input_flag), (args.label_column, "label_column")],
                        f"{source} ({name} split)")
    splits = encode_labels(splits, args.label_column, source)
    splits = split_train_validation_test(splits, args.validation_fraction, args.test_fraction,
                                         seed=args.split_seed, stratify=args.label_column)
    splits["train"] = take(splits["train"], args.max_train_samples)
    for name in ("validation", "test"):
        splits[name] = take(splits[name], args.max_eval_samples)
    labels = splits["train"].features[args.label_column].names
    splits = add_label_noise(splits, args, args.label_column, len(labels))
    shown = f" ({', '.join(labels)})" if show_labels else ""
    noise = f" ({100 * args.label_noise:g}% symmetric label noise on train and validation)" if args.label_noise else ""
    rank_zero_print(f"data: {source}: {len(labels)} classes{shown}; "
                    + ", ".join(f"{name} {len(ds)}" for name, ds in splits.items()) + noise)
    return splits, labels
