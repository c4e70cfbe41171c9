"""Training state on disk: model, optimizer and schedule in one safetensors file, written atomically.

Tensors go in the safetensors body, everything else (step, optimizer hyper-parameters, the
schedule's counters, caller metadata) as JSON in its header. Loading never unpickles anything.
``CheckpointDir`` is the one place that names, lists, reads and prunes ``step-<k>.safetensors``
files: the edge's ``<output-dir>/checkpoints`` and each cloud session's folder are both one.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def _frozen(module: torch.nn.Module) -> Set[str]:
    return {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def owned_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """What a module's checkpoint and final weights hold: its state dict less its frozen
    parameters. With LoRA those are the pretrained base (shared by every session of the model on
    a daemon, and rebuilt from the model by name); a fully fine-tuned module freezes nothing, so
    this is its whole state dict."""
    frozen = _frozen(module)
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items() if k not in frozen}


def load_owned(module: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Load what ``owned_state`` saved into a module built the same way (its frozen parameters
    from the base model); ValueError naming the tensors when the two do not match."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    absent = sorted(set(missing) - _frozen(module))
    if absent or unexpected:
        found = (("missing", absent), ("unexpected", sorted(unexpected)))
        listed = [
            f"{what}: {', '.join(names[:5])}" + (" ..." if len(names) > 5 else "")
            for what, names in found
            if names
        ]
        raise ValueError(
            "the saved weights do not fit this model: "
            + "; ".join(listed)
            + " (was it trained with other --peft / --lora-* flags, split or model?)"
        )


def pack(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: Any
) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Everything a bit-exact resume needs, as (tensors, JSON-able metadata); the module's
    frozen parameters are not saved (``owned_state``)."""
    tensors = {f"model/{k}": v for k, v in owned_state(module).items()}
    opt = optimizer.state_dict()
    scalars: Dict[str, Dict[str, Any]] = {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim/{idx}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    meta = {"param_groups": opt["param_groups"], "optim_scalars": scalars, "schedule": schedule.state_dict()}
    return tensors, meta


def unpack(
    tensors: Dict[str, torch.Tensor],
    meta: Dict,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
) -> None:
    """Restore what ``pack`` saved into freshly built objects of the same shape. The saved
    learning rates win over the new optimizer's (a resume continues the run that was saved)."""
    saved_groups, groups = len(meta["param_groups"]), len(optimizer.param_groups)
    if saved_groups != groups:  # one group, or two with --factor-lr (training.make_optimizer)
        raise ValueError(
            f"the checkpoint's optimizer has {saved_groups} parameter group(s), this run's {groups}: "
            "resume with the --factor-lr of the run that wrote it (given or left out alike)"
        )
    model_state = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    load_owned(module, model_state)
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["optim_scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    schedule.load_state_dict(meta["schedule"])


def save(path: str, tensors: Dict[str, torch.Tensor], meta: Dict) -> None:
    """Write a checkpoint atomically, ``meta`` as JSON under the header's ``sft`` key."""
    save_atomic(path, tensors, {"sft": json.dumps(meta, sort_keys=True)})


def save_atomic(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    """Any safetensors file, written atomically: a temporary file beside ``path``, fsync, then
    rename over it (readers never see half), then fsync the folder so the rename survives a crash."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str, device: str = "cpu") -> Tuple[Dict[str, torch.Tensor], Dict]:
    meta = read_meta(path)
    return load_file(path, device=device), meta


def read_meta(path: str) -> Dict:
    """The JSON header of a checkpoint file, without loading its tensors."""
    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
    if "sft" not in header:
        raise ValueError(f"{path} is not an SFT checkpoint (no 'sft' metadata)")
    return json.loads(header["sft"])


_STEP_FILE = re.compile(r"^step-(\d+)\.safetensors$")


class CheckpointDir:
    """A folder of ``step-<k>.safetensors`` checkpoints (the state after k steps), newest kept.

    Both sides keep 3 by default: an edge that crashes while writing one still finds a step
    that the cloud holds too.
    """

    def __init__(self, folder: str, keep: int = 3):
        self.folder = folder
        self.keep = keep

    def path(self, step: int) -> str:
        return os.path.join(self.folder, f"step-{step:09d}.safetensors")

    def steps(self) -> List[int]:
        """Steps with a complete checkpoint, newest first (temporary files are not listed)."""
        if not os.path.isdir(self.folder):
            return []
        found = (_STEP_FILE.match(name) for name in os.listdir(self.folder))
        return sorted((int(m.group(1)) for m in found if m), reverse=True)

    def save(self, step: int, tensors: Dict[str, torch.Tensor], meta: Dict) -> str:
        """Write the checkpoint of ``step`` atomically, then drop all but the newest ``keep``."""
        path = self.path(step)
        save(path, tensors, meta)
        for old in self.steps()[self.keep :]:
            os.remove(self.path(old))
        return path

    def meta(self, step: int) -> Dict:
        return read_meta(self.path(step))

    def load(self, step: int, device: str = "cpu") -> Tuple[Dict[str, torch.Tensor], Dict]:
        return load(self.path(step), device=device)

    def save_state(
        self,
        step: int,
        module,
        optimizer,
        schedule,
        extra: Optional[Dict[str, torch.Tensor]] = None,
        **meta: Any,
    ) -> str:
        """The training state after ``step`` steps (``pack``), with ``meta`` in the header;
        ``extra``: more of the session's state (delta mode's caches, under ``delta/``)."""
        tensors, header = pack(module, optimizer, schedule)
        tensors.update(extra or {})
        header.update(step=step, **meta)
        return self.save(step, tensors, header)

    def load_state(
        self, step: int, module, optimizer, schedule, device: str = "cpu", extra: Optional[Callable] = None
    ) -> Dict:
        """Restore what ``save_state`` wrote into fresh objects; returns the header. ``extra`` is
        called with all the checkpoint's tensors (on the CPU) to restore what ``save_state``'s took."""
        tensors, header = self.load(step, device=device)
        unpack(tensors, header, module, optimizer, schedule)
        if extra is not None:
            extra({k: v.cpu() for k, v in tensors.items() if not k.startswith(("model/", "optim/"))})
        return header

    def clear(self) -> None:
        """Remove every step checkpoint (other files in the folder stay)."""
        for step in self.steps():
            os.remove(self.path(step))
