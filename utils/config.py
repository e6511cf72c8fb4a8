"""Typed configuration: YAML files loaded into frozen dataclasses and validated once.

Every key is checked against the dataclass that owns it: an unknown key, a value of the wrong type
or out of range is a :class:`ConfigError` naming the file and the key, e.g.
``configs/x.yaml: train_args.lr must be > 0, got -1``. ``--set section.key=value`` overrides are
parsed as YAML scalars and typed by the same dataclasses. This module does not import torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import yaml

# What --set may change at inference: where the masks come from and how the sampler runs. Every other key
# changes what the trained network means (its shape, classes, prior, normalisation) or only matters to training.
INFERENCE_OVERRIDES = ("data_args.path", "data_args.num_workers", "sampling_args.num_steps", "sampling_args.sampler",
                       "sampling_args.precision", "sampling_args.guidance_scale", "sampling_args.compile",
                       "model_args.use_flash_attention", "model_args.low_precision_norm", "output_dir")
# Keys that may change between a run and its resumption (they do not change what is learned).
RESUMABLE_CHANGES = {
    "train_args.max_epochs", "train_args.max_steps", "train_args.devices", "train_args.num_nodes",
    "train_args.accelerator", "data_args.num_workers", "train_args.limit_train_batches",
    "train_args.limit_val_batches", "train_args.log_every_n_steps", "train_args.sample_every_n_epochs",
    # speed settings: same parameters, same state dict; numerics agree to rounding (tests/test_fast_paths.py)
    "train_args.compile", "model_args.use_flash_attention", "sampling_args.precision", "sampling_args.compile",
    "model_args.low_precision_norm", "train_args.memory_limit_gb",
    "train_args.logger", "train_args.logger_uri",  # where the metrics go besides TensorBoard and CSV
}


MIN_VOLUME_SIZE = 16  # data_args.image_size of a 3-D model


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class SyntheticConfig:
    """How to build the built-in synthetic set when the dataset file is missing: the echo phantom (2-D) or
    the brain phantom (3-D), as ``model_args.spatial_dims`` says."""

    size: int = 256
    patients: tuple[int, ...] = (350, 50, 50)
    seed: int = 0

    def check(self, key):
        require(self.size >= 16, key("size"), f"must be >= 16 (utils.data.synthetic_brain.MIN_SIZE), got {self.size}")
        require(len(self.patients) == 3 and min(self.patients) >= 1, key("patients"),
                f"must be three positive patient counts (train, valid, test), got {list(self.patients)}")


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/synthetic_echo.npz"
    num_classes: int = 4
    image_size: int = 256
    num_workers: int = 2
    synthetic: SyntheticConfig | None = None

    def check(self, key):
        require(self.num_classes >= 2, key("num_classes"), f"must be >= 2, got {self.num_classes}")
        require(self.image_size >= 8, key("image_size"), f"must be >= 8, got {self.image_size}")
        require(self.num_workers >= 0, key("num_workers"), f"must be >= 0, got {self.num_workers}")
        if self.synthetic is not None:
            require(self.synthetic.size == self.image_size, key("synthetic.size"),
                    f"must equal data_args.image_size ({self.image_size}), got {self.synthetic.size}")


@dataclass(frozen=True)
class ModelConfig:
    """MONAI DiffusionModelUNet + ControlNet hyperparameters (the seed's network by default)."""

    channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2, 2)
    attention_levels: tuple[bool, ...] = (False, False, True, True, True)
    num_head_channels: tuple[int, ...] = (32, 64, 128, 256, 512)
    norm_num_groups: int = 32
    resblock_updown: bool = True
    transformer_num_layers: int = 1
    conditioning_embedding_num_channels: tuple[int, ...] = (16,)
    # Attention through PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels) instead of
    # MONAI's einsum softmax (MOTFM's). Same parameters and state dict; outputs agree to float rounding.
    use_flash_attention: bool = True
    # GroupNorm in its input's dtype under autocast (CUDA's runs it in fp32): a bf16 residual stream stays bf16.
    low_precision_norm: bool = False
    # The output projection of the self-attention blocks (MONAI's include_fc). monai-generative 0.2.3, which the
    # seed's and MOTFM's code run on, defines it (proj_attn) but never applies it: false is that network. Class
    # conditioning puts transformer blocks where the self-attention blocks were, and there MONAI's include_fc
    # false would also drop a projection monai-generative applies, so false needs no class conditioning.
    attention_out_proj: bool = True
    # 2: images [B, 1, H, W]; 3: volumes [B, 1, D, H, W] (data_args.image_size N means N^3). Only method
    # flow_matching (COMET, MOTFM) builds a 3-D network.
    spatial_dims: int = 2

    def check(self, key):
        require(self.spatial_dims in (2, 3), key("spatial_dims"), f"must be 2 or 3, got {self.spatial_dims}")
        n = len(self.channels)
        for name in ("num_res_blocks", "attention_levels", "num_head_channels"):
            got = len(getattr(self, name))
            require(got == n, key(name), f"needs one entry per level ({n}), got {got}")
        for c in self.channels:
            require(c % self.norm_num_groups == 0, key("channels"),
                    f"each must be divisible by norm_num_groups ({self.norm_num_groups}), got {c}")
        for c, h in zip(self.channels, self.num_head_channels):
            require(h > 0 and c % h == 0, key("num_head_channels"),
                    f"each must divide its level's channels, got {h} for {c}")
        require(self.transformer_num_layers >= 1, key("transformer_num_layers"), "must be >= 1")


@dataclass(frozen=True)
class ConditioningConfig:
    """What the flow-matching network is conditioned on, and which conditions training drops (for guidance).

    ``mode``: the mask through the ControlNet, the image class through the UNet's (and ControlNet's)
    cross-attention (a one-hot context of the data's classes, as MOTFM), both, or neither.
    ``mask_input``: what the ControlNet sees, one channel label / (num_classes - 1) (``scalar``, the seed's and
    MOTFM's) or one channel per label (``one_hot``). Each training sample loses its whole mask with probability
    ``mask_dropout`` (the ControlNet sees all zeros), each of its anatomy labels with ``label_dropout`` (their
    pixels become background: a partial mask) and its class with ``class_dropout`` (a zero context); guidance
    (``sampling_args.guidance_scale``) contrasts with the dropped mask and class.
    """

    mode: Literal["mask", "class", "mask+class", "unconditional"] = "mask"
    mask_input: Literal["scalar", "one_hot"] = "scalar"
    mask_dropout: float = 0.0
    label_dropout: float = 0.0
    class_dropout: float = 0.0

    @property
    def uses_mask(self) -> bool:
        return "mask" in self.mode

    @property
    def uses_class(self) -> bool:
        return "class" in self.mode

    def check(self, key):
        for name in ("mask_dropout", "label_dropout", "class_dropout"):
            require(0.0 <= getattr(self, name) < 1.0, key(name), f"must be in [0, 1), got {getattr(self, name)}")
        if not self.uses_mask:
            for name in ("mask_dropout", "label_dropout"):
                require(getattr(self, name) == 0, key(name), f"must be 0 for {key('mode')} {self.mode} (no mask)")
            require(self.mask_input == "scalar", key("mask_input"),
                    f"must be left at scalar for {key('mode')} {self.mode} (no mask)")
        require(self.uses_class or self.class_dropout == 0, key("class_dropout"),
                f"must be 0 for {key('mode')} {self.mode} (no class)")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 4  # per device
    effective_batch_size: int = 16  # kept for any number of devices by adjusting accumulation
    max_epochs: int = 400
    max_steps: int = -1  # generator optimizer steps (a GAN's D steps not counted); -1 = run max_epochs
    lr: float = 1e-4
    precision: Literal["32-true", "16-mixed", "bf16-mixed"] = "16-mixed"
    gradient_clip_val: float = 1.0
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int = 0  # 0 = every visible GPU (CUDA_VISIBLE_DEVICES), or 1 on CPU
    num_nodes: int = 1
    seed: int = 42
    ema_decay: float = 0.0  # 0 = no EMA; else e.g. 0.999, used for sampling
    val_every_n_epochs: int = 1
    sample_every_n_epochs: int = 10  # sample grid + quick SSIM/PSNR
    num_sample_images: int = 8
    checkpoint_every_n_epochs: int = 10
    limit_train_batches: int = 0  # 0 = all
    limit_val_batches: int = 0  # 0 = all
    log_every_n_steps: int = 10
    # "blocks": torch.compile each UNet/ControlNet down/mid/up block in place (regional compilation:
    # state_dict keys unchanged). Faster steps after a first step that compiles (minutes on the seed network).
    # "full": the whole network as one graph (fullgraph, fixed shapes), the step towards CUDA graphs.
    compile: Literal["none", "blocks", "full"] = "none"
    # The network's and EMA's convolution weights channels-last (NHWC / NDHWC); activations follow. Pairs with
    # compile (inductor fuses the NCHW copies MONAI's attention blocks make). Same state dict.
    channels_last: bool = False
    # 3-D only: the memory (GiB) a training step may use; the fit is refused before it starts when the estimate
    # (utils.methods.memory) exceeds it. 0 = what the device has free (CUDA free memory, or available RAM).
    memory_limit_gb: float = 0.0
    # An extra Lightning logger beside TensorBoard and CSV: "mlflow" (package mlflow-skinny) logs to logger_uri,
    # "" = the run directory's local store file:<run_dir>/mlruns; experiment and run named after run_name.
    logger: Literal["none", "mlflow"] = "none"
    logger_uri: str = ""

    def check(self, key):
        for name in ("batch_size", "effective_batch_size", "max_epochs", "num_nodes",
                     "val_every_n_epochs", "sample_every_n_epochs", "checkpoint_every_n_epochs",
                     "log_every_n_steps", "num_sample_images"):
            require(getattr(self, name) >= 1, key(name), f"must be >= 1, got {getattr(self, name)}")
        for name in ("devices", "limit_train_batches", "limit_val_batches"):
            require(getattr(self, name) >= 0, key(name), f"must be >= 0, got {getattr(self, name)}")
        require(self.max_steps == -1 or self.max_steps >= 1, key("max_steps"),
                f"must be -1 or >= 1, got {self.max_steps}")
        require(self.lr > 0, key("lr"), f"must be > 0, got {self.lr}")
        require(self.gradient_clip_val >= 0, key("gradient_clip_val"), "must be >= 0")
        require(0.0 <= self.ema_decay < 1.0, key("ema_decay"), f"must be in [0, 1), got {self.ema_decay}")
        require(self.memory_limit_gb >= 0, key("memory_limit_gb"), f"must be >= 0, got {self.memory_limit_gb}")
        require(self.logger != "none" or not self.logger_uri, key("logger_uri"), f"needs {key('logger')} mlflow")


@dataclass(frozen=True)
class SamplingConfig:
    num_steps: int = 10
    # The sampler, one of the method's SAMPLERS; left out, the method's first (flow matching: euler; ddpm: ddim).
    # Configs written before it was named sampler call it method (utils.methods.upgrade renames it).
    sampler: str | None = None
    # Autocast for the network while sampling (validation grids, inferer, evaluate); "32-true" = none; "bf16-true":
    # a copy of the network with bf16 weights, ODE state and times fp32 (the ODE-sampled methods).
    precision: Literal["32-true", "16-mixed", "bf16-mixed", "bf16-true"] = "32-true"
    # Classifier-free guidance w (flow matching): v = v_uncond + w (v_cond - v_uncond), where v_uncond drops the
    # conditions training dropped (conditioning_args). 1 = no guidance (one network call per step; 2 otherwise).
    guidance_scale: float = 1.0
    # "full": the network that makes images compiled as one fixed-shape graph before the first batch (which
    # compiles); the last batch padded so one shape serves. The ODE-sampled methods.
    compile: Literal["none", "full"] = "none"

    def check(self, key):
        require(self.num_steps >= 1, key("num_steps"), f"must be >= 1, got {self.num_steps}")
        require(self.guidance_scale >= 0, key("guidance_scale"), f"must be >= 0, got {self.guidance_scale}")


@dataclass(frozen=True)
class RunConfig:
    """What every method's config has; a method's config (``utils/methods/<name>/config.py``) is a frozen
    subclass that adds its own sections (``SECTIONS``) and names its samplers and limits in class variables."""

    run_name: str
    output_dir: str = "checkpoints"
    method: str = "flow_matching"  # a method of the registry, utils.methods.METHODS
    data_args: DataConfig = field(default_factory=DataConfig)
    # the UNet + ControlNet of the methods with UNET (and the benchmark's MOTFM-like baseline)
    model_args: ModelConfig = field(default_factory=ModelConfig)
    train_args: TrainConfig = field(default_factory=TrainConfig)
    sampling_args: SamplingConfig = field(default_factory=SamplingConfig)

    SECTIONS: ClassVar[tuple[str, ...]] = ()  # the method's own sections, each defaulting to its dataclass
    SAMPLERS: ClassVar[tuple[str, ...]] = ()  # sampling_args.sampler's choices; the first is the default
    UNET: ClassVar[bool] = False  # whether the method's network is model_args' UNet + ControlNet
    VOLUMES: ClassVar[bool] = False  # whether the method builds a 3-D network (model_args.spatial_dims 3)
    GUIDANCE: ClassVar[bool] = False  # whether the method has classifier-free guidance
    # Keys added to the method after configs were written, each with the value that reproduces a written config
    # (a checkpoint's, a run directory's config.yaml) that lacks it: such a config holds every key it knew.
    WRITTEN_BEFORE: ClassVar[dict[str, object]] = {}
    # The method's keys --set may change at inference besides INFERENCE_OVERRIDES (its sampler's settings).
    INFERENCE_KEYS: ClassVar[tuple[str, ...]] = ()

    def check(self, key):
        require(bool(self.run_name) and "/" not in self.run_name, key("run_name"),
                f"must be a non-empty name without '/', got {self.run_name!r}")
        synthetic = self.data_args.synthetic
        if synthetic is not None and self.model_args.spatial_dims == 2:
            require(synthetic.size >= 32, "data_args.synthetic.size",
                    f"must be >= 32 for the 2-D echo phantom (utils.data.synthetic_echo.MIN_SIZE), "
                    f"got {synthetic.size}")
        require(self.sampling_args.sampler in self.SAMPLERS, "sampling_args.sampler",
                f"must be one of {list(self.SAMPLERS)} for method {self.method}, got {self.sampling_args.sampler!r}")
        require(self.GUIDANCE or self.sampling_args.guidance_scale == 1.0, "sampling_args.guidance_scale",
                f"must be 1 for method {self.method} (guidance is flow matching's), "
                f"got {self.sampling_args.guidance_scale}")
        s = self.sampling_args  # the ODE sampler calls the network through one adapter, which compiles or casts
        require("euler" in self.SAMPLERS or (s.compile, s.precision == "bf16-true") == ("none", False), "sampling_args",
                f"compile full and precision bf16-true are for the ODE-sampled methods, not {self.method}")
        require(self.UNET or not (self.train_args.channels_last or self.model_args.low_precision_norm), "train_args",
                f"channels_last and model_args.low_precision_norm are for the UNet methods, not {self.method}")
        require(not (self.model_args.low_precision_norm and self.train_args.precision == "16-mixed"),
                "model_args.low_precision_norm", "needs bf16-mixed: fp16 GroupNorm gradients overflow under 16-mixed")
        if self.UNET:
            depth = 2 ** (len(self.model_args.channels) - 1)
            require(self.data_args.image_size % depth == 0, "data_args.image_size",
                    f"must be divisible by {depth} for {len(self.model_args.channels)} UNet levels, "
                    f"got {self.data_args.image_size}")
        dims = self.model_args.spatial_dims
        require(dims == 2 or self.VOLUMES, "model_args.spatial_dims",
                f"3 (volumes) is only supported by method flow_matching (COMET, MOTFM); method {self.method} "
                f"is 2-D only: set model_args.spatial_dims to 2 or method to flow_matching")
        require(dims == 2 or self.data_args.image_size >= MIN_VOLUME_SIZE, "data_args.image_size",
                f"must be >= {MIN_VOLUME_SIZE} for volumes (the 3-D SSIM's window is 11 voxels, the brain phantom's "
                f"smallest side 16), got {self.data_args.image_size}")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, key: str):
    """Check ``value`` (parsed YAML) against the annotation ``tp``; return it typed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {_type_name(tp)} for {key}")


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    key = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            kwargs[f.name] = _convert(values[f.name], hints[f.name], key(f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key(f.name)}")
    obj = cls(**kwargs)
    obj.check(key)
    return obj


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings to a nested dict (values parsed as YAML scalars)."""
    out = yaml.safe_load(yaml.safe_dump(values))  # deep copy of plain data
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep or not dotted:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return out


def read_yaml_mapping(path: str | Path) -> dict:
    """The mapping at the top of a YAML file; a missing file, bad YAML or another top level is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: " + ("a directory, not a YAML file" if path.is_dir() else "config file not found"))
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text YAML file (byte {e.start} is not UTF-8)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return values


def build_dataclass(cls, values: dict, source: str):
    """A typed, validated instance of a config dataclass ``cls``; errors are prefixed with ``source``."""
    try:
        return _build(cls, values, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def config_to_dict(cfg) -> dict:
    """Plain nested dict (lists, not tuples): YAML- and checkpoint-safe. Other methods' sections are left out."""
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    return yaml.safe_load(yaml.safe_dump(_plain(values), sort_keys=False))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys
