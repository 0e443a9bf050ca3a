"""Helpers of the training scripts in `scripts/` (installed with hf_sam, so the scripts import them
without editing `sys.path`). Nothing in `hf_sam` imports this package.

One module per purpose; all but `parser` load without torch or transformers (those are imported
inside the functions that need them), so `--help` and bad flags answer in a fraction of a second:

- `errors`: ScriptError / ConfigError / DataError and `run_main`, the `__main__` entry point that prints
  bad input (and hf_sam's refusals) as one line instead of a traceback.
- `threads`: `choose_threads`, the CPU threads a process should use (cores it may run on, the load,
  the processes of a launch); `--torch_threads` overrides it. scripts/bench.py uses it for its children.
- `arguments`: the argument dataclasses every script shares (`CommonArguments`, `LoraArguments`).
- `cli`: `parse_script_args`, `--help` and the unknown-setting check, answered from the source of the argument
  classes (read, not imported) before the heavy libraries load.
- `parser`: `ScriptParser` (HfArgumentParser + `--config file.yaml`), `reproduce_command`.
- `models`: `resolve_model_path` (`package:<module>/<folder>`), LoRA (`apply_lora`), `train_bpe`.
- `data`: dataset checks and splits, and `load_text_data` (Hub dataset / local text files).
- `run`: what happens around `trainer.train()`: `prepare_run` (threads, seed, quiet output),
  `checkpoint_to_resume`, `check_launch`, `accuracy_metrics`, `train_and_finish` (attach_sharpness,
  train, evaluate, finish_run), `rank_zero_print`.
- `plots`: `draw_panels`, the figure of plot_runs.py and measure_sharpness.py.
"""
