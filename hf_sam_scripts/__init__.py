"""Helpers of the training scripts in `scripts/` (installed with hf_sam, so the scripts import them
without editing `sys.path`). Nothing in `hf_sam` imports this package.

One module per purpose; only `errors`, `threads`, `arguments` and `quickstart` load without torch or
transformers, so `--help` and bad flags answer in a fraction of a second:

- `errors`: ScriptError / ConfigError / DataError and `run_main`, the `__main__` entry point that prints
  bad input (and hf_sam's refusals) as one line instead of a traceback.
- `threads`: `choose_threads`, the CPU threads a process should use (cores it may run on, the load,
  the processes of a launch); `--torch_threads` overrides it. scripts/bench.py uses it for its children.
- `arguments`: the argument dataclasses every script shares (`CommonArguments`, `LoraArguments`).
- `quickstart`: `--help` and the unknown-setting check, answered from the source of the argument
  classes (read, not imported) before the heavy libraries load.
- `parser`: `ScriptParser` (HfArgumentParser + `--config file.yaml`) and `parse_script_args`.
- `models`: `resolve_model_path` (`package:<module>/<folder>`), LoRA (`apply_lora`), `train_bpe`.
- `data`: dataset checks and splits, and `load_text_data` (Hub dataset / local text files).
- `run`: what happens around `trainer.train()`: `prepare_run` (threads, seed, quiet output),
  `checkpoint_to_resume`, `check_launch`, `attach_sharpness`, `finish_run`, `rank_zero_print`.
"""
