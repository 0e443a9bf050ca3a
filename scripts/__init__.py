"""The scripts, importable as `scripts.train_vit` etc. from the repository root (tests, notebooks); run them as files."""
