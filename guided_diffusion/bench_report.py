"""What the benchmark and check scripts print about their machine and append to
docs/benchmarks.md (a dated heading, the command, notes and a markdown table)."""

import datetime
import os
import platform

import torch as th


def describe_machine(device):
    """GPU name with torch / CUDA versions, or the CPU model with its cores and torch threads."""
    if device.type == "cuda":
        return f"{th.cuda.get_device_name(device)}, torch {th.__version__}, CUDA {th.version.cuda}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"CPU {name} ({os.cpu_count()} logical cores visible), {th.get_num_threads()} torch "
            f"thread(s), torch {th.__version__}")


def append_markdown(path, title, command, notes, table, suffix=""):
    """Append ``### {title} {UTC time}{suffix}``, the command, the notes as a list and the table."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(path, "a") as f:
        f.write(f"\n### {title} {stamp}{suffix}\n\nCommand: `{command}`\n\n")
        f.write("\n".join(f"- {n}" for n in notes) + "\n\n" + table + "\n")
