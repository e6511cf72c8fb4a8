"""One prepared GPU window: the speed ablation of the seed network's training step and 10-step sampler.

Examples:
    OUT=/tmp/probe bash bench/device_probe.sh                     # the seed config on the GPU (< 8 min on an H200)
    python bench/device_probe.py --tiny --backend aot_eager --out /tmp/probe     # CPU: the whole script in seconds

Training (a flow-matching step of the velocity network: MSE, backward, clipping at 1, Adam; fused and capturable
on CUDA) and sampling (N Euler steps on the host time grid) are timed cumulatively:
eager -> +cudnn.benchmark -> +channels-last -> +bf16 GroupNorm (``model_args.low_precision_norm``) ->
+compile(fullgraph) -> +CUDA graph, each against the first in the
same process, with its compile seconds, peak memory and, for training, the loss's and gradients' relative error
against fp32 eager (TF32 off) on the same weights and batch, from the variant's uncaptured step (a captured step
is timed, not yet compared with eager). A GroupNorm gradient check at 128 channels / 32 groups / 64x64
(bf16, channels-last, compiled against fp32 eager: pytorch issue 140913's shape) runs too. CUDA-only steps are
recorded as skipped on a CPU; a step that fails is recorded with its error and the rest go on. Writes
probe.json, profile.txt (top 25 kernels of the fastest training variant) and, after compiling, inductor_cache.bin
(``torch.compiler.save_cache_artifacts``; --cache loads it first, so a later window skips the compile).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.throughput import timed  # noqa: E402  (first call, one more warm-up, then the timed calls)

VARIANTS = ("eager", "+cudnn.benchmark", "+channels-last", "+bf16-groupnorm", "+compile(fullgraph)", "+cuda-graph")
CUDA_ONLY = {"+cudnn.benchmark": "cuDNN is CUDA's", "+cuda-graph": "CUDA graphs need CUDA"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config_path", default="configs/comet_camus.yaml", help="the network (default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="configs/tiny.yaml at batch 2 on the CPU, 2 iterations")
    p.add_argument("--out", default="probe_out", help="output folder (default: %(default)s)")
    p.add_argument("--train_batch", type=int, default=32)
    p.add_argument("--sample_batches", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--num_steps", type=int, default=10, help="Euler steps per sample (default: %(default)s)")
    p.add_argument("--iters", type=int, default=10,
                   help="timed calls per training variant and sampling at batch 16; fewer at larger sampling "
                        "batches, at least 2 (default: %(default)s)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (tests: aot_eager)")
    p.add_argument("--cache", help="inductor_cache.bin of an earlier probe, loaded before compiling")
    p.add_argument("--budget", type=float, default=330.0,
                   help="seconds after which no further variant starts (default: %(default)s)")
    return p


def relative_error(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


class Probe:
    """The network, one fixed batch and the fp32 eager reference of one training step."""

    def __init__(self, cfg, batch: int, device, backend: str):
        import torch

        from utils.methods.networks import build_model

        self.cfg, self.device, self.backend = cfg, device, backend
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        torch.manual_seed(0)
        self.initial = build_model(cfg.model_args, cfg.data_args.num_classes).state_dict()
        size = cfg.data_args.image_size
        g = torch.Generator().manual_seed(1)
        self.x_1 = torch.rand(batch, 1, size, size, generator=g).mul(2).sub(1).to(device)
        self.x_0 = torch.randn(batch, 1, size, size, generator=g).to(device)
        self.t = torch.rand(batch, generator=g).to(device)
        self.mask = torch.randint(0, cfg.data_args.num_classes, (batch, 1, size, size), generator=g,
                                  dtype=torch.uint8).to(device)
        with exact_fp32():
            self.reference = self.gradients(self.network(), torch.float32)

    def network(self, channels_last: bool = False, low_norm: bool = False):
        import torch

        from utils.methods.networks import build_model, low_precision_norms

        net = build_model(self.cfg.model_args, self.cfg.data_args.num_classes).to(self.device)
        net.load_state_dict(self.initial)
        if low_norm:
            low_precision_norms(net)
        return net.to(memory_format=torch.channels_last) if channels_last else net

    def loss(self, net, dtype):
        import torch

        t = self.t.view(-1, 1, 1, 1)
        x_t, target = (1 - t) * self.x_0 + t * self.x_1, self.x_1 - self.x_0
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            v = net(x_t, self.t, self.mask)
        return torch.nn.functional.mse_loss(v.float(), target)

    def gradients(self, net, dtype) -> tuple:
        import torch

        net.zero_grad(set_to_none=True)
        loss = self.loss(net, dtype)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten().float() for p in net.parameters() if p.grad is not None])


class exact_fp32:
    """TF32 off for matmuls and convolutions inside (PyTorch lets cuDNN use it by default): the reference is fp32."""

    def __enter__(self):
        import torch

        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        import torch

        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def set_cudnn(device, on: bool) -> None:
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = on


def train_variant(probe: Probe, k: int, iters: int) -> dict:
    """The training step with the first ``k`` + 1 levers of :data:`VARIANTS` on."""
    import torch

    torch._dynamo.reset()  # each variant compiles afresh: no recompile limit reached, no silent eager fall-back
    set_cudnn(probe.device, k >= 1)
    net = probe.network(channels_last=k >= 2, low_norm=k >= 3)
    if k >= 4:
        net.compile(fullgraph=True, dynamic=False, backend=probe.backend)
    start = time.perf_counter()
    loss, grads = probe.gradients(net, probe.dtype)  # compiles, for k >= 4; the numerics of the uncaptured step
    errors = {"first_gradients_s": round(time.perf_counter() - start, 3),
              "loss_rel_err": relative_error(loss, probe.reference[0]),
              "grad_rel_err": relative_error(grads, probe.reference[1])}
    fused = probe.device.type == "cuda"
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=fused or None, capturable=fused and k >= 5)

    def step():
        opt.zero_grad(set_to_none=k < 5)
        probe.loss(net, probe.dtype).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True)
        opt.step()

    return {**timed(captured(step, probe.device) if k >= 5 else step, 2, iters, probe.device), **errors}


def captured(step, device):
    """``step`` captured once as a CUDA graph after three eager warm-up calls on a side stream (the recipe of
    torch.cuda.graphs' docs), then replayed."""
    import torch

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def sample_variant(probe: Probe, k: int, batch: int, num_steps: int, iters: int) -> dict:
    """N Euler steps of ``batch`` images with the first ``k`` + 1 levers on (the solve captured whole at k = 5)."""
    import torch

    from utils.methods.ode_sampler import host_steps, time_grid

    torch._dynamo.reset()
    set_cudnn(probe.device, k >= 1)
    net = probe.network(channels_last=k >= 2, low_norm=k >= 3).eval()
    if k >= 4:
        net.compile(fullgraph=True, dynamic=False, backend=probe.backend)
    reps = -(-batch // len(probe.x_0))
    x_0 = probe.x_0.repeat(reps, 1, 1, 1)[:batch].clone()
    mask = probe.mask.repeat(reps, 1, 1, 1)[:batch]
    steps = host_steps(time_grid(num_steps), ())
    times = [torch.full((batch,), ts[0], device=probe.device) for _, ts in steps]
    out = torch.empty_like(x_0)

    @torch.no_grad()
    def solve():
        x = x_0
        for (dt, _), t in zip(steps, times):
            with torch.autocast(probe.device.type, dtype=probe.dtype, enabled=probe.dtype != torch.float32):
                v = net(x, t, mask)
            x = x + dt * v.float()
        out.copy_(x)

    return timed(captured(solve, probe.device) if k >= 5 else solve, 2, iters, probe.device)


def groupnorm_check(device, backend: str) -> dict:
    """Weight and bias gradients of GroupNorm(32, 128) on 64x64, bf16 channels-last compiled vs fp32 eager (the
    module and input cast to bf16: autocast would run GroupNorm in fp32)."""
    import torch

    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(32, 128).to(device)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(4, 128, 64, 64, device=device)
    upstream = torch.randn_like(x)

    def grads(module, inputs):
        module.zero_grad(set_to_none=True)
        (module(inputs).float() * upstream).sum().backward()
        return module.weight.grad.float(), module.bias.grad.float()

    reference = grads(norm, x)
    low = copy.deepcopy(norm).to(torch.bfloat16)
    fast = torch.compile(low, fullgraph=True, dynamic=False, backend=backend)
    got = grads(fast, x.to(torch.bfloat16, memory_format=torch.channels_last))
    return {"weight_grad_rel_err": relative_error(got[0], reference[0]),
            "bias_grad_rel_err": relative_error(got[1], reference[1])}


def attempt(record: dict, name: str, device, fn, deadline: float, save) -> None:
    """``record[name]`` = fn()'s result, or why it was skipped or failed (the probe goes on either way); nothing
    starts after ``deadline`` (``time.perf_counter``), and ``save`` writes probe.json after each, so a window that
    ends during the next variant still returns this one."""
    lever = name.split(" ")[0]
    if device.type != "cuda" and lever in CUDA_ONLY:
        record[name] = {"skipped": CUDA_ONLY[lever]}
    elif time.perf_counter() > deadline:
        record[name] = {"skipped": "the probe's time budget (--budget) was spent"}
    else:
        try:
            record[name] = fn()
        except Exception as e:  # a failing lever is a result of the probe, not the end of it
            record[name] = {"failed": f"{type(e).__name__}: {e}", "where": traceback.format_exc(limit=-3)}
    print(f"{name}: {json.dumps(record[name])}", flush=True)
    save()


def profile_top(probe: Probe, k: int, path: Path) -> None:
    """The top 25 operators by device (else CPU) time of a few training steps of variant ``k`` (before capture)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if probe.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_variant(probe, min(k, 4), 2)
    key = "cuda_time_total" if probe.device.type == "cuda" else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=25))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from utils.methods import load_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        args.config_path, args.train_batch, args.sample_batches, args.iters = "configs/tiny.yaml", 2, [2], 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    caching = hasattr(torch.compiler, "save_cache_artifacts")  # torch >= 2.7
    if caching and args.cache and Path(args.cache).is_file():
        torch.compiler.load_cache_artifacts(Path(args.cache).read_bytes())
    cfg = load_config(args.config_path)
    probe = Probe(cfg, args.train_batch, device, args.backend)
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "config": args.config_path, "train_batch": args.train_batch,
              "num_steps": args.num_steps, "backend": args.backend, "train": {}, "sample": {}}
    deadline = time.perf_counter() + args.budget

    def save():
        (out / "probe.json").write_text(json.dumps(record, indent=2) + "\n")

    attempt(record, "groupnorm_check", device, lambda: groupnorm_check(device, args.backend), deadline, save)
    for k, name in enumerate(VARIANTS):
        attempt(record["train"], name, device, lambda k=k: train_variant(probe, k, args.iters), deadline, save)
    for batch in args.sample_batches:
        iters = max(2, min(args.iters, args.iters * 16 // batch))  # about as many images per variant at any batch
        for k, name in enumerate(VARIANTS):
            attempt(record["sample"], f"{name} batch {batch}", device,
                    lambda k=k, b=batch, n=iters: sample_variant(probe, k, b, args.num_steps, n), deadline, save)
    timed_ok = [k for k, name in enumerate(VARIANTS) if "per_call_s" in record["train"][name]]
    if timed_ok:
        profile_top(probe, min(timed_ok, key=lambda k: record["train"][VARIANTS[k]]["per_call_s"]),
                    out / "profile.txt")
    artifacts = torch.compiler.save_cache_artifacts() if caching else None
    if artifacts is not None:
        (out / "inductor_cache.bin").write_bytes(artifacts[0])
    print(f"wrote {out / 'probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
