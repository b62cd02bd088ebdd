"""Training checkpoints: one safetensors file holding model weights, optimizer state and RNG states.

Tensor keys: ``model.<name>`` (state_dict), ``optim.<param index>.<key>`` (per-parameter optimizer state),
``rng.torch`` / ``rng.cuda.<device>``. Metadata (JSON strings): format, kind, config, step, the optimizer's
param_groups, any extra state and ``checksum`` (SHA-256 of every tensor's name, dtype, shape and bytes, checked on
load, so flipped bytes give an error instead of a model that trains to NaN). Writes go to a temporary file in the
same folder (mode 0666 minus the umask, like any file), are fsynced, then renamed over the target with os.replace,
so a kill leaves either the old or the new checkpoint, never a torn one; temporary files a kill left behind are
removed by the next save of the same checkpoint.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "dpar-checkpoint-v1"


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that shares storage with nothing (safetensors refuses shared storage)."""
    return tensor.detach().to("cpu", copy=True).contiguous()


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = _owned(torch.as_tensor(value))
    return tensors, state["param_groups"]


def save_checkpoint(path: str, *, kind: str, config: dict, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None) -> None:
    """Atomically write a checkpoint of ``model`` (and ``optimizer``, RNG states) at training ``step``."""
    tensors = {f"model.{name}": _owned(value) for name, value in model.state_dict().items()}
    metadata = {"format": FORMAT, "kind": kind, "config": json.dumps(config, sort_keys=True), "step": str(step),
                "extra": json.dumps(extra or {}, sort_keys=True)}
    if optimizer is not None:
        optim_tensors, param_groups = _optimizer_tensors(optimizer)
        tensors.update(optim_tensors)
        metadata["optim_param_groups"] = json.dumps(param_groups)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{device}"] = state
    metadata["checksum"] = tensors_checksum(tensors)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(_temp_pattern(path, "*")):  # left by a process killed while writing
        os.remove(stale)
    tmp_path = _temp_pattern(path, f"{os.getpid()}-{secrets.token_hex(4)}")
    os.close(os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies
    try:
        mode = os.stat(tmp_path).st_mode & 0o777
        save_file(tensors, tmp_path, metadata=metadata)
        os.chmod(tmp_path, mode)  # safetensors writes files 0600
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as error:
        raise OSError(error.errno, f"checkpoint {path} could not be written ({error}); the previous checkpoint, "
                                   f"if any, is unchanged") from error
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def _temp_pattern(path: str, tag: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".tmp-{name}-{tag}.safetensors")


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of the tensors' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def read_checkpoint(path: str, with_tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a checkpoint file; ValueError naming the file when it is missing or corrupt."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()} if with_tensors else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"checkpoint {path} is corrupt or not a safetensors file: {error}") from error
    if metadata.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} has format {metadata.get('format')!r}, expected {FORMAT!r}")
    if with_tensors and "checksum" in metadata and tensors_checksum(tensors) != metadata["checksum"]:
        raise ValueError(f"checkpoint {path} is corrupt: its tensors do not match the checksum stored with them")
    return metadata, tensors


def _info(metadata: dict[str, str]) -> dict:
    return {"kind": metadata["kind"], "config": json.loads(metadata["config"]), "step": int(metadata["step"]),
            "extra": json.loads(metadata["extra"])}


def checkpoint_info(path: str) -> dict:
    """kind, config, step and extra of a checkpoint (from its header)."""
    return _info(read_checkpoint(path, with_tensors=False)[0])


def _load_model(path: str, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    saved = {key[len("model."):]: value for key, value in tensors.items() if key.startswith("model.")}
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, value in expected.items():
        if saved[name].shape != value.shape:
            raise ValueError(f"checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, the model expects "
                             f"{tuple(value.shape)}")
    model.load_state_dict(saved)


def _load_optimizer(path: str, optimizer: torch.optim.Optimizer, metadata: dict[str, str],
                    tensors: dict[str, torch.Tensor]) -> None:
    if "optim_param_groups" not in metadata:
        raise ValueError(f"checkpoint {path} holds no optimizer state")
    param_groups = json.loads(metadata["optim_param_groups"])
    current = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in param_groups] != [len(g["params"]) for g in current]:
        raise ValueError(f"checkpoint {path}: optimizer parameter groups do not match the model's")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def load_checkpoint(path: str, model: torch.nn.Module, *, kind: str, config: dict | None = None,
                    optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = False) -> dict:
    """Load weights (and optimizer / RNG state) into ``model``; returns checkpoint_info's dict.

    ValueError naming ``path`` when the file is corrupt, was written for another kind or config, or its tensors
    do not fit the model.
    """
    metadata, tensors = read_checkpoint(path)
    if metadata.get("kind") != kind:
        raise ValueError(f"checkpoint {path} holds a {metadata.get('kind')!r} model, expected {kind!r}")
    saved_config = json.loads(metadata["config"])
    config = None if config is None else json.loads(json.dumps(config, sort_keys=True))
    if config is not None and saved_config != config:
        differing = sorted(k for k in set(saved_config) | set(config) if saved_config.get(k) != config.get(k))
        raise ValueError(f"checkpoint {path} was written with another config (differs in {differing})")
    _load_model(path, model, tensors)
    if optimizer is not None:
        _load_optimizer(path, optimizer, metadata, tensors)
    if restore_rng:
        torch.set_rng_state(tensors["rng.torch"])
        cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
    return _info(metadata)
