"""CPU threads for torch on a machine other work shares."""
import os

import torch


def idle_threads() -> tuple:
    """CPU threads for torch, and why: its default (one a physical core), less the cores other processes keep
    busy (the 1-minute load average). Threads beyond the idle cores wait on each other: on 2 cores under a load
    of 5, SD1.5's UNet ran 3.4x faster on 1 thread than on 2."""
    default = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        return default, "torch's default"
    cores = os.cpu_count() or default
    threads = max(1, min(default, round(cores - load)))
    return threads, f"torch's default {default}, fitted to the idle cores: load {load:.1f} on {cores}"
