"""Generating images with any method: shared by inferer.py, evaluate.py, the validation grids and the benchmark.

Each method's own ``generate`` makes the images; this splits the work into batches and over devices and
hands each batch its samples' noise. Every random number of sample i depends only on (seed, i).
"""

from __future__ import annotations

import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm import tqdm

from utils.precision import autocast
from utils.seeding import SampleNoise

_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> {device: its sampling copy}


def default_batch_size(device: str, volumes: bool) -> int:
    """Samples per generation batch when none is given: 64 on a GPU, 8 on a CPU; volumes one at a time (a
    batch of 64 volumes of 96^3 does not fit a GPU). Shared by inferer.py and evaluate.py."""
    if volumes:
        return 1
    return 64 if str(device).startswith("cuda") else 8


@dataclass
class Generated:
    images: torch.Tensor  # (N, 1, H, W) or (N, 1, D, H, W) float32 in [0, 1]
    nfe: int  # network evaluations per sample
    seconds: float


def generate(module, masks: torch.Tensor, sample_ids: torch.Tensor, seed: int, num_steps: int, sampler: str,
             batch_size: int, devices: list[str], progress: bool = True, batch_invariant: bool = False,
             references: torch.Tensor | None = None, t0: float = 0.0, feature_guidance: float = 0.0,
             classes: torch.Tensor | None = None) -> Generated:
    """Images for ``masks`` (N, 1, H, W) or volumes for (N, 1, D, H, W) uint8, like them; sample ``k`` uses the
    noise of (seed, sample_ids[k]).

    ``classes`` (N,) int64: each sample's image class, for (and only for) a class-conditional module.
    With ``references`` (N, 1, H, W) in [-1, 1] (a method with ``supports_reference``), sample k is guided by
    reference k: it starts at ``t0`` on the path towards it (``generate_from_reference``, with its experimental
    ``feature_guidance`` scale).

    Work is split over ``devices`` (the module itself on its own device, a copy on any other; one thread
    each; see :func:`same_device`). Batch size and device count
    do not change the noise, the prior or the sampler; batched kernels (convolutions, matrix products)
    still round differently for different batch sizes (about 1e-7 here). ``batch_invariant`` runs the
    network on one image at a time, which makes results bitwise identical for any batch size, at a cost.
    The network runs under the autocast of the checkpoint's ``sampling_args.precision`` (default: none; bf16-true:
    bfloat16 weights, :func:`sampling_copy`), compiled when its ``sampling_args.compile`` says so.
    """
    n = len(masks)
    if (classes is not None) != bool(module.class_names):
        raise ValueError("give classes exactly when the module is class-conditional "
                         f"(its classes: {module.class_names or 'none'})")
    shape = tuple(masks.shape[1:])
    out = torch.empty((n, *shape), dtype=torch.float32)
    chunks = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    models = [sampling_copy(module, d) for d in devices]
    # a network compiled for fixed shapes sees every batch at batch_size: the last one padded with its last sample
    pad_to = min(batch_size, n) if module.cfg.sampling_args.compile != "none" and not batch_invariant else 0
    bar = tqdm(total=n, unit="img", desc="generating", disable=not progress, dynamic_ncols=True)

    if references is not None and not module.supports_reference:
        raise ValueError(f"method {module.cfg.method} has no reference-guided generation")

    def solve(m, mask: torch.Tensor, ids: torch.Tensor, ref: torch.Tensor | None,
              cls: torch.Tensor | None) -> torch.Tensor:
        noise = SampleNoise(ids, seed, shape, m.device)
        extra = {} if cls is None else {"classes": cls}
        with torch.inference_mode(), autocast(m.cfg.sampling_args.precision, m.device):
            if ref is not None:  # feature guidance takes its gradient outside inference mode
                return m.generate_from_reference(mask, ref, noise, num_steps, sampler, t0, feature_guidance).float()
            return m.generate(mask, noise, num_steps, sampler, **extra).float()

    def work(k: int, chunk: list[int]) -> None:
        m = models[k % len(models)]
        idx = torch.tensor(chunk + chunk[-1:] * (pad_to - len(chunk)))
        mask, ids = masks[idx].to(m.device), sample_ids[idx]
        ref, cls = (None if x is None else x[idx].to(m.device) for x in (references, classes))
        if batch_invariant:  # the network sees one image at a time
            def one(x: torch.Tensor | None, j: int) -> torch.Tensor | None:
                return None if x is None else x[j:j + 1]

            images = torch.cat([solve(m, mask[j:j + 1], ids[j:j + 1], one(ref, j), one(cls, j))
                                for j in range(len(chunk))])
        else:
            images = solve(m, mask, ids, ref, cls)
        out[idx[:len(chunk)]] = images[:len(chunk)].cpu()
        bar.update(len(chunk))

    start = time.perf_counter()
    if len(models) == 1:
        for k, chunk in enumerate(chunks):
            work(k, chunk)
    else:
        with ThreadPoolExecutor(len(models)) as pool:
            for group in range(0, len(chunks), len(models)):
                list(pool.map(work, range(group, min(group + len(models), len(chunks))),
                              chunks[group:group + len(models)]))
    bar.close()
    nfe = module.nfe(num_steps, sampler) if references is None else module.nfe(num_steps, sampler, t0)
    return Generated(out, nfe, time.perf_counter() - start)


def same_device(a: str | torch.device, b: str | torch.device) -> bool:
    """Whether two device specs name the same device ("cuda" is the current CUDA device, "cpu:0" is "cpu")."""

    def canonical(spec) -> tuple[str, int]:
        d = torch.device(spec)
        if d.type == "cpu":
            return "cpu", 0
        if d.index is not None:
            return d.type, d.index
        return d.type, torch.cuda.current_device() if d.type == "cuda" and torch.cuda.is_available() else 0

    return canonical(a) == canonical(b)


def sampling_copy(module, device: str):
    """The module that samples on ``device``: itself where it is, a copy elsewhere; with ``sampling_args.precision:
    bf16-true`` or ``sampling_args.compile: full`` always a copy (its sampling network in bfloat16, or compiled:
    the module's own network, which may be training, stays as it is). A copy is made once per module and device
    and given the module's current weights at every call (training goes on between validation grids), in place,
    so a compiled copy compiles once. It holds the whole module: one more module's memory while it lives."""
    s = module.cfg.sampling_args
    cast = s.precision == "bf16-true"
    if same_device(module.device, device) and not cast and s.compile == "none":
        m = module
    else:
        copies = _COPIES.setdefault(module, {})
        m = copies.get(str(device))
        if m is None:
            m = copies[str(device)] = _copy_to(module, device)
            if cast:
                m.sampling_network().to(torch.bfloat16)
        else:
            m.load_state_dict(module.state_dict())
    m.compile_for_sampling()
    return m


def _copy_to(module, device: str):
    import copy

    return copy.deepcopy(module).to(device).eval()
