"""How many CPU threads a process should give torch.

torch's own default is one thread per core of the machine, whatever else runs on it. On a shared
machine that oversubscribes the cores: a 22M-parameter LoRA job ran at 30.9 s/step with the
default on 2 busy cores, and took 4.9 min in all with one thread. `choose_threads` counts the cores
this process may run on (`os.sched_getaffinity`), takes off the ones the load average says are
busy, and splits the rest between the processes of a launch (torchrun / accelerate set
LOCAL_WORLD_SIZE). scripts/bench.py calls it for its child processes.
"""

import os


def available_cores():
    """Cores this process may run on (its CPU affinity; all cores where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cores():
    """Cores the 1-minute load average says other work keeps busy (0 where unknown)."""
    try:
        return int(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0


def choose_threads(requested=None, processes=None):
    """CPU threads per process: `requested` when given (--torch_threads), else OMP_NUM_THREADS when
    set, else the free cores divided between the processes.

    processes: how many processes share the cores (default: LOCAL_WORLD_SIZE, or 1). Several
    processes get one thread each on a small machine (2 processes on 2 cores: 1 each). Always >= 1.
    """
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"torch_threads must be an integer >= 1, got {requested!r}.")
        return int(requested)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) >= 1:
        return int(os.environ["OMP_NUM_THREADS"])  # the user's (or the launcher's) choice
    if processes is None:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")) or 1)
    cores = available_cores()
    free = max(1, cores - busy_cores())
    return max(1, min(cores // max(1, processes), free // max(1, processes)))


def describe(threads, requested=None):
    """One line for the log: the threads and why."""
    if requested is not None:
        return f"torch threads: {threads} (--torch_threads)"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return f"torch threads: {threads} (OMP_NUM_THREADS; --torch_threads N to choose)"
    return (f"torch threads: {threads} ({available_cores()} cores available, load {busy_cores()}; "
            "--torch_threads N to choose)")
