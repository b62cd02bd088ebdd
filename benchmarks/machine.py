"""What a benchmark run ran on: CPU model, ISA path, threads, GPU, software versions and commit.

``machine_info()`` is stored in the benchmark JSON by benchmarks/conftest.py (the process that timed) and copied
into every row of benchmarks/report.py's results.
"""
from __future__ import annotations

import os
import platform
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model(cpuinfo: str | None = None) -> str:
    """"<model name> (family F, model M)" from /proc/cpuinfo (the model name alone hides the generation on VMs)."""
    fields = _cpuinfo_fields(cpuinfo)
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def isa_from_flags(flags: set[str]) -> str:
    """The ISA path the CPU kernels can take on a CPU with these /proc/cpuinfo flags."""
    if "avx512f" in flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "default"


def cpu_isa(cpuinfo: str | None = None) -> str:
    """``dk.cpu_isa()`` (the path the compiled extension takes) where it exists, else derived from the CPU flags."""
    try:
        import dpar_kernels as dk

        if hasattr(dk, "cpu_isa"):
            return str(dk.cpu_isa())
    except ImportError:
        pass
    return isa_from_flags(set(_cpuinfo_fields(cpuinfo).get("flags", "").split()))


def git_commit() -> str:
    """Short commit of the checkout, with "+dirty" when tracked files differ from it ("unknown" outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def machine_info() -> dict:
    """The machine and software of this process (strings and ints, JSON-ready)."""
    import torch

    info = {"cpu_model": cpu_model(), "isa": cpu_isa(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "",
            "python": platform.python_version(), "torch": torch.__version__, "commit": git_commit()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = ""
    return info


def machine_label() -> str:
    """One line: CPU model, ISA path, cores, torch threads (and the GPU, if any)."""
    info = machine_info()
    gpu = f", GPU {info['gpu']}" if info["gpu"] else ""
    return f"{info['cpu_model']}, {info['isa']}, {info['cores']} cores, torch threads {info['threads']}{gpu}"


def _cpuinfo_fields(text: str | None) -> dict[str, str]:
    """The first value of each "key : value" line of /proc/cpuinfo (or of ``text``)."""
    if text is None:
        try:
            with open("/proc/cpuinfo") as f:
                text = f.read()
        except OSError:
            return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields
