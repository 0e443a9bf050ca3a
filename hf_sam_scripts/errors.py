"""Errors the user can fix, and the entry point that prints them as one line."""

import os
import sys


class ScriptError(ValueError):
    """Bad input (config, data, model) found before training starts."""


class ConfigError(ScriptError):
    """A config file or a flag that cannot be used."""


class DataError(ScriptError):
    """A dataset that lacks what the script needs (a column, a split, enough examples)."""


def _raised_by_hf_sam(err):
    """True when the innermost frame of err's traceback is in the hf_sam package (a documented refusal)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    parts = os.path.normpath(tb.tb_frame.f_code.co_filename).split(os.sep)
    return "hf_sam" in parts[-3:-1]


def run_main(main, parse_args=None):
    """`if __name__ == "__main__": run_main(main, parse_args)`: parse, then train (main() alone without
    parse_args).

    Bad input (ScriptError) and hf_sam's refusals (a ValueError raised inside hf_sam, e.g. FSDP asked
    for on a CPU) end with one line `error: ...` on stderr (from the first process only, under a
    launcher) and exit status 2, instead of a traceback.
    """
    try:
        main(*parse_args()) if parse_args is not None else main()
    except (ScriptError, ValueError) as err:
        if not isinstance(err, ScriptError) and not _raised_by_hf_sam(err):
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
