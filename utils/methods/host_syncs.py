"""Find the operations that make the host wait for the GPU, on any device, the CPU included.

An op that needs a value or a size computed on the device (``.item()``, ``if tensor:``, boolean indexing,
``nonzero``) blocks the host until the GPU queue drains, so the host cannot run ahead to launch the next
kernels, and a CUDA graph cannot be captured around it. These ops run on the CPU too, where they cost nothing:
:class:`SyncDetector` records them as they are dispatched, so a CPU test can prove a step free of them.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that read a device value or size back to the host whatever their arguments (on CUDA).
ALWAYS = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "allclose", "masked_select", "unique_dim",
          "_unique", "_unique2", "unique_consecutive", "unique_dim_consecutive", "bincount"}
# Indexing ops whose output size, with a boolean index, is the number of True values.
INDEXING = {"index", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_"}
# Frames of the dispatch machinery, skipped when naming the code that asked for a device value.
_MACHINERY = {Path(__file__).resolve(), *(Path(torch.__file__).resolve().parent / p for p in (
    "utils/_python_dispatch.py", "_ops.py", "_tensor.py", "overrides.py", "_compile.py", "_dynamo/eval_frame.py"))}


@dataclass(frozen=True)
class Sync:
    op: str  # e.g. "aten._local_scalar_dense.default"
    where: str  # "file:line function" of the code that asked for the value (outside the dispatch machinery)


def forces_sync(func, args, kwargs) -> bool:
    """Whether the aten overload ``func`` called with ``args``/``kwargs`` reads the device on CUDA."""
    name = func._schema.name.split("::")[-1]
    if name in ALWAYS:
        return True
    if name in INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if name == "repeat_interleave":  # tensor repeats without output_size: the output size is repeats.sum()
        repeats = args[0] if len(args) == 1 else args[1]
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    return False


def _caller() -> str:
    """The innermost frame outside the dispatch machinery: the code that asked for the device value."""
    for frame in reversed(traceback.extract_stack()):
        if Path(frame.filename).resolve() not in _MACHINERY:
            return f"{frame.filename}:{frame.lineno} {frame.name}"
    return "?"


class SyncDetector(TorchDispatchMode):
    """Records in ``syncs`` every op that would make the host wait for ``device_type``'s queue.

    Only ops with a tensor argument on ``device_type`` count: on a GPU run ``"cuda"`` ignores host-side
    tensors (data loading, Adam's CPU step counter); a CPU test passes ``"cpu"`` to stand in for the device.
    Copies from the device to the host (``.cpu()``, ``.tolist()``) are seen only on a real device. With
    ``strict`` the first such op raises instead.
    """

    def __init__(self, device_type: str = "cuda", strict: bool = False):
        super().__init__()
        self.device_type, self.strict = device_type, strict
        self.syncs: list[Sync] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._on_device(args, kwargs) and (forces_sync(func, args, kwargs) or self._to_host(func, args, kwargs)):
            sync = Sync(str(func), _caller())
            if self.strict:
                raise RuntimeError(f"host sync: {sync.op} at {sync.where}")
            self.syncs.append(sync)
        return func(*args, **kwargs)

    def _on_device(self, args, kwargs) -> bool:
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        return any(t.device.type == self.device_type for t in tensors)

    def _to_host(self, func, args, kwargs) -> bool:
        """A copy from a device tensor into host memory (never on the CPU alone)."""
        if self.device_type == "cpu" or func._schema.name not in ("aten::_to_copy", "aten::copy_"):
            return False
        source, target = (args[1], args[0].device) if func._schema.name == "aten::copy_" else (
            args[0], kwargs.get("device"))
        return source.device.type == self.device_type and target is not None and torch.device(target).type == "cpu"
