"""Training and sampling throughput: the MOTFM-like baseline against the framework's own code paths.

Examples:
    python bench/throughput.py --batch_sizes 16 32 --output docs/bench.json
    python bench/throughput.py --settings comet-bf16 comet-bf16-compiled --batch_sizes 32
    python bench/throughput.py --tasks sample --batch_sizes 64 256     # sampling only (large batches)
    python bench/throughput.py --batch_sizes 16 --profile docs/profiles   # + the top kernels of a step
    python bench/throughput.py --tiny            # tiny network on the CPU in seconds (the test suite runs this)

In one process and at each batch size, after warm-up, it measures
  - the baseline (MOTFM-like), a plain PyTorch loop: fp16 autocast, MONAI's einsum attention, plain Adam,
    gradient clipping at 1.0, MSE loss, N(0, I) prior; sampling with the same network under fp16 autocast;
  - each framework setting through the real code: the config method's training_step (for COMET: warm-start
    prior, flow matching and the contrastive term, switched on from the first step) under a Lightning Trainer
    with the project's optimizer and clipping, and utils.generation.generate (what inferer.py and evaluate.py
    run) for sampling.
Images per second, peak GPU memory, achieved TFLOP/s (network FLOPs counted with FlopCounterMode), the fraction
of the device's 16-bit peak and the ratio to the baseline are printed as JSON lines, then as a markdown table.
docs/BENCHMARKS.md explains every column.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

log = logging.getLogger("comet.bench")


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    precision: str  # Lightning precision for training and sampling (fp16 becomes fp32 on a CPU, as in trainer.py)
    flash: bool  # model_args.use_flash_attention: PyTorch SDPA instead of MONAI's einsum attention
    compile: str  # train_args.compile: none, blocks or full
    about: str
    more: tuple[str, ...] = ()  # further config keys, as --set items "section.key=value"

    @property
    def samples(self) -> bool:
        """Whether its sampling is timed: eager sampling is the eager row's, unless the setting sets its own."""
        return self.compile == "none" or any(item.startswith("sampling_args.") for item in self.more)


BASELINE = Setting("motfm", "16-mixed", False, "none",
                   "MOTFM-like plain loop: fp16 autocast, einsum attention, Adam, clip 1.0, MSE, N(0, I) prior")
SETTINGS = {s.name: s for s in (
    Setting("comet-fp16-einsum", "16-mixed", False, "none", "framework, the seed recipe with MONAI's einsum attention"),
    Setting("comet-fp16", "16-mixed", True, "none", "framework, the seed config as shipped: fp16, SDPA attention"),
    Setting("comet-fp32", "32-true", True, "none", "framework, fp32 (TF32 matmuls), SDPA, fused Adam on CUDA"),
    Setting("comet-bf16", "bf16-mixed", True, "none", "framework, bf16, SDPA, fused Adam on CUDA"),
    Setting("comet-bf16-compiled", "bf16-mixed", True, "blocks",
            "framework, bf16, SDPA, fused Adam, torch.compile of each UNet/ControlNet block (training only)"),
    Setting("comet-bf16-fullgraph", "bf16-mixed", True, "full",
            "framework, bf16, SDPA, fused Adam, torch.compile of the whole network as one graph (training only)"),
    Setting("comet-bf16-fast", "bf16-mixed", True, "full",
            "framework, bf16, SDPA, fused Adam, channels-last, bf16 GroupNorm, whole-network compile; sampling with "
            "bf16 weights (fp32 ODE state), compiled",
            ("train_args.channels_last=true", "model_args.low_precision_norm=true",
             "sampling_args.precision=bf16-true", "sampling_args.compile=full")),
)}
DEFAULT_SETTINGS = [name for name, s in SETTINGS.items() if s.compile == "none"]

# Dense (not sparse) 16-bit tensor-core peaks in TFLOP/s from NVIDIA's datasheets; first match in the name wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200 NVL", 835.0), ("H200", 989.0),
               ("A100", 312.0), ("L40S", 362.0))

COLUMNS = (("setting", "setting"), ("task", "task"), ("batch", "batch_size"), ("precision", "precision"),
           ("attention", "attention"), ("optimizer", "optimizer"), ("img/s", "images_per_s"),
           ("x baseline", "ratio_to_baseline"), ("peak GiB", "peak_gib"), ("TFLOP/s", "tflops"),
           ("of peak", "fraction_of_peak"), ("first step s", "first_step_s"), ("compile s", "compile_s"))


def build_parser() -> argparse.ArgumentParser:
    from utils.cli import add_renamed, docstring_parser

    p = docstring_parser(__doc__)
    p.add_argument("--config_path", help="network, prior and loss (default: configs/comet_camus.yaml; "
                                         "with --tiny configs/tiny.yaml)")
    p.add_argument("--batch_sizes", type=int, nargs="+", help="batch sizes (default: 16 32; --tiny: 2)")
    add_renamed(p, "--num_steps", "--steps", type=int, default=10, help="Euler sampling steps (default: %(default)s)")
    p.add_argument("--iters", type=int, help="timed training steps per setting (default: 10; --tiny: 2)")
    p.add_argument("--warmup", type=int, help="untimed training steps before them (default: 3; --tiny: 1)")
    p.add_argument("--sample_batches", type=int,
                   help="timed sampling batches, after one untimed batch (default: 3; --tiny: 1)")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=DEFAULT_SETTINGS,
                   help="framework settings besides the baseline, which always runs (default: all but "
                        "the compiled ones, whose first step compiles for minutes)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available (--tiny: cpu)")
    p.add_argument("--peak_tflops", type=float,
                   help="the device's dense 16-bit peak for 'of peak' (default: known NVIDIA GPUs by name)")
    p.add_argument("--tiny", action="store_true", help="tiny network, few iterations, CPU: a smoke test")
    p.add_argument("--tasks", nargs="+", choices=("train", "sample"), default=["train", "sample"],
                   help="what to measure (default: both; sampling alone samples from the untrained network, "
                        "which costs the same)")
    p.add_argument("--profile", metavar="DIR",
                   help="after the timed window, profile one more training step and sampling batch of every "
                        "setting with torch.profiler and write the top operators to DIR/<setting>_<task>_b<N>.txt")
    p.add_argument("--output", help="also write the environment and all results to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    return p


def _defaults(args) -> None:
    tiny = args.tiny
    args.config_path = args.config_path or ("configs/tiny.yaml" if tiny else "configs/comet_camus.yaml")
    args.batch_sizes = args.batch_sizes or ([2] if tiny else [16, 32])
    args.iters = args.iters if args.iters is not None else (2 if tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    args.sample_batches = args.sample_batches if args.sample_batches is not None else (1 if tiny else 3)
    args.device = args.device or ("cpu" if tiny else None)
    for name in ("num_steps", "iters", "warmup", "sample_batches"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be >= 1, got {getattr(args, name)}")
    if min(args.batch_sizes) < 2:
        raise SystemExit("error: --batch_sizes must be >= 2 (the contrastive term needs negatives)")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise SystemExit(f"error: --peak_tflops must be > 0, got {args.peak_tflops}")


# --- measuring ----------------------------------------------------------------------------------------------
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(fn, warmup: int, iters: int, device) -> dict:
    """Run ``fn`` warmup + iters times; seconds of the first call, seconds per timed call, peak GiB of those."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        fn()
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return {"first_s": first, "per_call_s": (time.perf_counter() - start) / iters, "calls": iters,
            "peak_gib": _peak_gib(device)}


def count_flops(model_cfg, num_classes: int, image_size: int) -> tuple[float, float]:
    """Network FLOPs per image: (one forward, one forward + backward), for this exact configuration.

    Counted by ``FlopCounterMode`` on meta tensors (shapes only: nothing is computed or allocated). Only the
    network counts (convolutions, matmuls, attention); the prior, the losses and the optimizer are left out.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from utils.methods.networks import build_model

    b = 2
    with torch.device("meta"):
        model = build_model(model_cfg, num_classes)
        spatial = (image_size,) * model_cfg.spatial_dims  # an image, or a volume with spatial_dims 3
        x_t, t = torch.zeros(b, 1, *spatial), torch.zeros(b)
        mask = torch.zeros(b, 1, *spatial, dtype=torch.uint8)
    with FlopCounterMode(display=False) as forward:
        model(x_t, t, mask)
    with FlopCounterMode(display=False) as step:
        model(x_t, t, mask).square().mean().backward()
    return forward.get_total_flops() / b, step.get_total_flops() / b


def make_dataset(path: Path, num_images: int, image_size: int, num_classes: int, spatial_dims: int = 2) -> Path:
    """Random uint8 images and label masks (4 images per patient, as in CAMUS; volumes with ``spatial_dims`` 3)
    in the project's npz layout."""
    import numpy as np

    from utils.data.dataset_io import save_dataset

    rng = np.random.default_rng(0)

    def records(split: str, n: int) -> list[dict]:
        shape = (1, *(image_size,) * spatial_dims)
        return [{"image": rng.integers(0, 256, shape, dtype=np.uint8),
                 "mask": rng.integers(0, num_classes, shape, dtype=np.uint8),
                 "metadata": {"patient": f"{split}{i // 4:04d}"}} for i in range(n)]

    data = {"train": records("train", num_images), "valid": records("valid", 1), "test": records("test", 1)}
    return save_dataset(path, data, overwrite=True)


def baseline(cfg, batch: int, args, device) -> tuple[dict, dict]:
    """The MOTFM-like reference: (training timing, sampling timing) from a plain loop on device batches."""
    import torch
    import torch.nn.functional as F
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler

    from utils.methods.networks import VelocityAdapter, build_model
    from utils.methods.ode_sampler import sample
    from utils.precision import autocast, resolve_precision

    precision = resolve_precision(BASELINE.precision, "gpu" if device.type == "cuda" else "cpu")
    model_cfg = dataclasses.replace(cfg.model_args, use_flash_attention=BASELINE.flash)
    model = build_model(model_cfg, cfg.data_args.num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train_args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    path = AffineProbPath(scheduler=CondOTScheduler())
    spatial = (cfg.data_args.image_size,) * cfg.model_args.spatial_dims
    gen = torch.Generator(device).manual_seed(0)
    x_1 = torch.rand(batch, 1, *spatial, device=device, generator=gen) * 2 - 1
    mask = torch.randint(0, cfg.data_args.num_classes, (batch, 1, *spatial), device=device, generator=gen)

    def train_step():
        t = torch.rand(batch, device=device)
        ps = path.sample(x_0=torch.randn_like(x_1), x_1=x_1, t=t)
        with autocast(precision, device):
            v = model(ps.x_t, t, mask)
        loss = F.mse_loss(v.float(), ps.dx_t)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train_args.gradient_clip_val)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    def sample_batch():
        with torch.inference_mode(), autocast(precision, device):
            sample(VelocityAdapter(model), torch.randn_like(x_1), mask, args.num_steps, "euler")

    info, train, sampling = {"precision": precision, "optimizer": "Adam"}, {}, {}
    if "train" in args.tasks:
        train = {**timed(train_step, args.warmup, args.iters, device), **info}
        profiled(train_step, args.profile, f"{BASELINE.name}_train_b{batch}", device)
    if "sample" in args.tasks:
        model.eval()
        sampling = {**timed(sample_batch, 1, args.sample_batches, device), **info}
        profiled(sample_batch, args.profile, f"{BASELINE.name}_sample_b{batch}", device)
    return train, sampling


def framework(cfg, setting: Setting, batch: int, args, device, data_path: Path, workdir: Path) -> tuple[dict, dict]:
    """The framework's training step (Lightning, as trainer.py) and sampling (generate, as inferer.py)."""
    import torch

    from utils.config import apply_overrides, config_to_dict
    from utils.data.datamodule import EchoDataModule
    from utils.generation.generate import generate
    from utils.methods import config_from_dict, method_class
    from utils.precision import resolve_precision

    accelerator = "gpu" if device.type == "cuda" else "cpu"
    precision = resolve_precision(setting.precision, accelerator)
    values = config_to_dict(cfg)
    values["data_args"].update(path=str(data_path), synthetic=None)
    values["model_args"]["use_flash_attention"] = setting.flash
    values["train_args"].update(batch_size=batch, effective_batch_size=batch, precision=setting.precision,
                                compile=setting.compile, accelerator=accelerator, devices=1)
    if "contrastive_args" in values:
        keys = values["contrastive_args"]
        keys["warmup_epochs"] = 0  # the contrastive term is part of every timed step
        keys["num_keys"] = -(-keys["num_keys"] // batch) * batch  # whole micro-batches: at least the batch
    values["sampling_args"].update(num_steps=args.num_steps, precision=precision)  # the method's own sampler
    values = apply_overrides(values, list(setting.more))
    run_cfg = config_from_dict(values, f"{args.config_path} (benchmark setting {setting.name})")
    dm = EchoDataModule(run_cfg.data_args, batch, run_cfg.train_args.seed,
                        spatial_dims=run_cfg.model_args.spatial_dims)
    module = method_class(run_cfg.method).for_data(run_cfg, dm)
    info, train = {"precision": precision, "optimizer": "-"}, {}
    if "train" in args.tasks:
        train = train_framework(module, dm, precision, setting, batch, args, device, workdir)
        info["optimizer"] = train["optimizer"]
    if not setting.samples or "sample" not in args.tasks:
        return train, {}
    module.to(device).eval()  # Lightning moves the module back to the CPU after fit
    masks = dm.train_set.mask[: batch * args.sample_batches]
    where, sampler = [str(module.device)], run_cfg.sampling_args.sampler

    def sample(n: int) -> None:
        generate(module, masks[:n], torch.arange(n), 0, args.num_steps, sampler, batch, where, progress=False)

    _sync(device)
    start = time.perf_counter()
    sample(batch)
    _sync(device)
    first = time.perf_counter() - start
    _reset_peak(device)
    start = time.perf_counter()
    sample(len(masks))
    _sync(device)
    per_batch = (time.perf_counter() - start) / args.sample_batches
    sampling = {"first_s": first, "per_call_s": per_batch, "calls": args.sample_batches,
                "peak_gib": _peak_gib(device), **info, "precision": run_cfg.sampling_args.precision}
    profiled(lambda: sample(batch), args.profile, f"{setting.name}_sample_b{batch}", device)
    return train, sampling


def train_framework(module, dm, precision: str, setting: Setting, batch: int, args, device, workdir: Path) -> dict:
    """Time the method's training step under a Lightning Trainer as trainer.py builds it."""
    import pytorch_lightning as pl

    steps = args.warmup + args.iters
    profile_to = Path(args.profile) / f"{setting.name}_train_b{batch}.txt" if args.profile else None
    timer = step_timer(args.warmup, args.iters, device, profile_to)
    trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
                         **module.trainer_arguments(1, steps + bool(profile_to)), limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer], default_root_dir=workdir)
    trainer.fit(module, datamodule=dm)
    if not timer.elapsed:
        raise RuntimeError(f"{setting.name}: training stopped before step {steps}")
    fused = bool(trainer.optimizers[0].defaults.get("fused"))
    return {"first_s": timer.first_s, "per_call_s": timer.elapsed / args.iters, "calls": args.iters,
            "peak_gib": timer.peak_gib, "precision": precision, "optimizer": "Adam (fused)" if fused else "Adam"}


def profiled(fn, directory: str | None, name: str, device) -> None:
    """With ``directory``: one more call of ``fn`` under torch.profiler, its top operators to ``directory/name.txt``."""
    if directory:
        profiler = start_profiler(device)
        fn()
        write_profile(profiler, device, Path(directory) / f"{name}.txt")


def start_profiler(device):
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))
    profiler.start()
    return profiler


def write_profile(profiler, device, path: Path) -> None:
    """Stop ``profiler`` and write its operators to ``path``: by self time on the GPU (CUDA only), then on the CPU
    (where launch overhead and host syncs show)."""
    _sync(device)
    profiler.stop()
    keys = (["self_device_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(profiler.key_averages().table(sort_by=k, row_limit=25) for k in keys) + "\n")
    log.info("wrote %s", path)


def step_timer(warmup: int, iters: int, device, profile_to: Path | None = None):
    """A Lightning callback (built here so that Lightning is imported after argument parsing)."""
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        """Wall time of the first training step, and of steps warmup .. warmup + iters - 1 (data loading included);
        with ``profile_to``, the step after those is profiled."""

        def __init__(self, warmup: int, iters: int, device):
            self.warmup, self.last, self.device = warmup, warmup + iters - 1, device
            self.first_s = self.elapsed = 0.0
            self.peak_gib = None
            self._clock = 0.0
            self._profiler = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if profile_to is not None and batch_idx == self.last + 1:
                self._profiler = start_profiler(self.device)
            if batch_idx in (0, self.warmup):
                _sync(self.device)
                if batch_idx == self.warmup:
                    _reset_peak(self.device)
                self._clock = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self._profiler is not None:
                write_profile(self._profiler, self.device, profile_to)
                self._profiler = None
            if batch_idx in (0, self.last):
                _sync(self.device)
                if batch_idx == 0:
                    self.first_s = time.perf_counter() - self._clock
                else:
                    self.elapsed = time.perf_counter() - self._clock
                    self.peak_gib = _peak_gib(self.device)

    return StepTimer(warmup, iters, device)


# --- reporting ----------------------------------------------------------------------------------------------
def environment(device, config_path: str, peak_tflops: float | None) -> dict:
    from importlib.metadata import version

    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    if peak_tflops is None and device.type == "cuda":
        peak_tflops = next((tf for key, tf in PEAK_TFLOPS if key in name), None)
    return {"record": "environment", "device": name, "peak_tflops_16bit": peak_tflops, "config": config_path,
            "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
            "monai": version("monai"), "lightning": version("pytorch_lightning"), "python": sys.version.split()[0],
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def result(setting: Setting, task: str, batch: int, timing: dict, flop_per_image: float, env: dict,
           reference: dict | None) -> dict:
    """One measurement as a flat record (``reference`` is the baseline's record for the same task and batch)."""
    ips = batch / timing["per_call_s"]
    tflops = ips * flop_per_image / 1e12
    peak = env["peak_tflops_16bit"]
    compile_s = timing["first_s"] - timing["per_call_s"] if setting.compile != "none" else None
    row = {"record": "result", "setting": setting.name, "task": task, "batch_size": batch,
           "precision": timing["precision"], "attention": "sdpa" if setting.flash else "einsum",
           "optimizer": timing["optimizer"] if task == "train" else "-", "compile": setting.compile,
           "images_per_s": ips, "ratio_to_baseline": ips / reference["images_per_s"] if reference else 1.0,
           "peak_gib": timing["peak_gib"], "gflop_per_image": flop_per_image / 1e9, "tflops": tflops,
           "fraction_of_peak": tflops / peak if peak else None, "first_step_s": timing["first_s"],
           "compile_s": compile_s, "timed_images": batch * timing["calls"]}
    # 4 significant digits, not 4 decimals: a slow CPU reaches ~1e-5 TFLOP/s, which 4 decimals would write as 0
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()}


def markdown_table(rows: list[dict]) -> str:
    def cell(key: str, value) -> str:
        if value is None:
            return "-"
        if key == "fraction_of_peak":
            return f"{value:.1%}"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(k, r[k]) for _, k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _defaults(args)
    output = Path(args.output) if args.output else None
    if output is not None and output.exists() and not args.overwrite:
        raise SystemExit(f"error: {output} exists; pass --overwrite to replace it")
    from utils.cli import configure_logging

    configure_logging()

    import torch

    from utils.config import ConfigError
    from utils.methods import load_config

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA device is visible")
        torch.set_float32_matmul_precision("high")  # as trainer.py: TF32 for the fp32 parts
    try:
        cfg = load_config(args.config_path)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    env = environment(device, args.config_path, args.peak_tflops)
    forward, train_step = count_flops(cfg.model_args, cfg.data_args.num_classes, cfg.data_args.image_size)
    env.update(gflop_forward_per_image=round(forward / 1e9, 3), gflop_train_step_per_image=round(train_step / 1e9, 3),
               sampling_steps=args.num_steps, iters=args.iters, warmup=args.warmup, sample_batches=args.sample_batches,
               settings={s.name: s.about for s in (BASELINE, *(SETTINGS[n] for n in args.settings))})
    emit(env)
    rows = []
    with tempfile.TemporaryDirectory(prefix="comet_bench_") as tmp:
        for batch in args.batch_sizes:
            images = batch * max(args.warmup + args.iters + 1, args.sample_batches)  # +1: the profiled step
            data = make_dataset(Path(tmp) / f"data_b{batch}.npz", images, cfg.data_args.image_size,
                                cfg.data_args.num_classes, cfg.model_args.spatial_dims)
            reference = {}
            for setting in (BASELINE, *(SETTINGS[n] for n in args.settings)):
                log.info("benchmark: %s at batch %d", setting.name, batch)
                if setting is BASELINE:
                    train, sampling = baseline(cfg, batch, args, device)
                else:
                    train, sampling = framework(cfg, setting, batch, args, device, data, Path(tmp))
                sample_flop = forward * args.num_steps
                for task, timing, flop in (("train", train, train_step), ("sample", sampling, sample_flop)):
                    if not timing:
                        continue
                    row = result(setting, task, batch, timing, flop, env, reference.get(task))
                    reference.setdefault(task, row)
                    rows.append(row)
                    emit(row)
                if device.type == "cuda":  # free this setting's memory before the next one measures its peak
                    gc.collect()
                    torch.cuda.empty_cache()
    print(f"\n{env['device']}, torch {env['torch']}, MONAI {env['monai']}, Lightning {env['lightning']}, "
          f"{env['date']}; {args.config_path}, {args.num_steps} sampling steps\n")
    print(markdown_table(rows))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"environment": env, "results": rows}, indent=1) + "\n")
        log.info("wrote %s", output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
