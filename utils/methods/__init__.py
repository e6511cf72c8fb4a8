"""The one door to the methods: each is a package ``utils/methods/<name>/`` with a ``config.py`` (a frozen
:class:`utils.config.RunConfig` subclass declaring its sections and samplers) and a ``module.py`` (a
:class:`utils.methods.base.SynthesisMethod` subclass), named by ``method`` in a config and registered here.

Everything outside ``utils/methods/`` reaches a method through these functions; a package is imported only
when its method is used (its config class is light: no torch).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from utils.config import (
    INFERENCE_OVERRIDES,
    ConfigError,
    RunConfig,
    apply_overrides,
    build_dataclass,
    read_yaml_mapping,
)

log = logging.getLogger(__name__)

# config ``method`` -> ("package.config:RunConfigClass", "package.module:ModuleClass")
METHODS = {
    "flow_matching": ("utils.methods.flow_matching.config:FlowMatchingRunConfig",
                      "utils.methods.flow_matching.module:FlowMatchingModule"),
    "ddpm": ("utils.methods.ddpm.config:DDPMRunConfig", "utils.methods.ddpm.module:DDPMModule"),
    "spade": ("utils.methods.spade.config:SpadeRunConfig", "utils.methods.spade.module:SpadeModule"),
    "med_dt_fm": ("utils.methods.med_dt_fm.config:MedDTFMRunConfig", "utils.methods.med_dt_fm.module:MedDTFMModule"),
}


def _load(name: str, which: int):
    if name not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)}, got {name!r}")
    module, cls = METHODS[name][which].split(":")
    return getattr(importlib.import_module(module), cls)


def config_class(name: str) -> type[RunConfig]:
    """The run config class of method ``name``."""
    return _load(name, 0)


def method_class(name: str):
    """The SynthesisMethod subclass of method ``name``."""
    return _load(name, 1)


def samplers() -> dict[str, tuple[str, ...]]:
    """Each method's samplers (sampling_args.sampler), its default first."""
    return {name: config_class(name).SAMPLERS for name in METHODS}


def all_samplers() -> tuple[str, ...]:
    return tuple(dict.fromkeys(s for names in samplers().values() for s in names))


def upgrade(values: dict, announce: bool = True) -> dict:
    """A config dict of an earlier layout in today's: ``sampling_args.method`` (the sampler) is now
    ``sampling_args.sampler``; logged once per config when ``announce``."""
    sampling = values.get("sampling_args")
    if not isinstance(sampling, dict) or "method" not in sampling:
        return values
    if "sampler" in sampling:
        raise ConfigError("sampling_args.method is the old name of sampling_args.sampler: give only sampler")
    sampling = {("sampler" if k == "method" else k): v for k, v in sampling.items()}
    if announce:
        log.warning("sampling_args.method is now called sampling_args.sampler (read as sampler: %s)",
                    sampling["sampler"])
    return {**values, "sampling_args": sampling}


def as_written(values: dict) -> dict:
    """A config that was written whole (a checkpoint's, a run directory's config.yaml) in today's layout: keys its
    method gained since take the value that reproduces it (``WRITTEN_BEFORE``), not today's default."""
    values = upgrade(values)
    method = values.get("method", RunConfig.method)
    if method not in METHODS:
        return values
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for dotted, value in config_class(method).WRITTEN_BEFORE.items():
        section, key = dotted.split(".")
        if isinstance(values.get(section), dict):
            values[section].setdefault(key, value)
    return values


def with_method_defaults(values: dict) -> dict:
    """``values`` with the method's sampler filled in; another method's section is an error naming its owner."""
    method = values.get("method", RunConfig.method)
    own = config_class(method).SECTIONS
    for owner in METHODS:
        if owner != method:
            for section in config_class(owner).SECTIONS:
                if values.get(section) is not None and section not in own:
                    raise ConfigError(f"{section} belongs to method {owner}, not to method {method}: remove it "
                                      f"(method {method} reads {', '.join(own) or 'no section'})")
    sections = {s for name in METHODS for s in config_class(name).SECTIONS}
    values = {k: v for k, v in values.items() if v is not None or k not in sections}  # null: left out
    sampling = values.get("sampling_args")
    if sampling is None or isinstance(sampling, dict):
        values["sampling_args"] = {"sampler": config_class(method).SAMPLERS[0], **(sampling or {})}
    return values


def config_from_dict(values: dict, source: str = "<config>") -> RunConfig:
    """Build and validate the run config of ``values["method"]``; errors are prefixed with ``source``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(values).__name__}")
    try:
        values = with_method_defaults(upgrade(values))
        cls = config_class(values.get("method", RunConfig.method))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return build_dataclass(cls, values, source)


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Load a YAML config file, apply ``--set`` overrides, validate. Errors name the file and key."""
    values = read_yaml_mapping(path)
    source = f"{path}" + (f" (with --set {' '.join(overrides)})" if overrides else "")
    return config_from_dict(apply_overrides(upgrade(values), list(overrides)), source)


def inference_config(config: dict, overrides: list[str], source: str) -> RunConfig:
    """A checkpoint's ``config`` (:func:`as_written`) with each ``--set section.key=value`` changing exactly that
    key, validated.

    Keys outside :data:`utils.config.INFERENCE_OVERRIDES` and the method's ``INFERENCE_KEYS`` are refused with a
    :class:`ConfigError` naming the key.
    """
    allowed = INFERENCE_OVERRIDES + config_class(config.get("method", RunConfig.method)).INFERENCE_KEYS
    for item in overrides:
        key = item.partition("=")[0]
        if key not in allowed:
            raise ConfigError(f"--set {key} cannot change at inference: it changes what the trained network "
                              f"means (allowed: {', '.join(allowed)})")
    where = f"{source} with --set {' '.join(overrides)}" if overrides else source
    return config_from_dict(apply_overrides(as_written(config), list(overrides)), where)


def sampling_overrides(num_steps: int | None, sampler: str | None) -> list[str]:
    """``--set`` items for the CLIs' --num_steps / --sampler flags (given ones only), so that the checkpoint's
    method validates them like any other override."""
    items = [] if num_steps is None else [f"sampling_args.num_steps={num_steps}"]
    return items + ([] if sampler is None else [f"sampling_args.sampler={sampler}"])


def load_module(checkpoint: str | Path, device="cpu", overrides: list[str] = ()):
    """Rebuild the trained method (any :class:`utils.methods.base.SynthesisMethod`) from a checkpoint alone,
    with inference ``--set`` overrides applied; in eval mode on ``device``.

    Raises :class:`utils.generation.checkpoints.CheckpointError` for a file that is not a usable COMET
    checkpoint and :class:`ConfigError` for a refused or invalid override; both name the file or key.
    """
    from utils.generation.checkpoints import CheckpointError, read_checkpoint

    ckpt = read_checkpoint(checkpoint)
    hp = dict(ckpt["hyper_parameters"])
    cfg = inference_config(hp.pop("config"), list(overrides), f"{checkpoint}'s config")
    module = method_class(cfg.method)(cfg, **hp)
    try:
        result = module.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as e:  # a tensor of another shape
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise CheckpointError(f"{checkpoint}: weights do not fit the network of its config ({detail})") from e
    for what, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)):
        if keys:
            raise CheckpointError(f"{checkpoint}: state_dict does not match its config: {len(keys)} {what} "
                                  f"key(s), e.g. {keys[0]}")
    return module.to(device).eval()


def resolve_checkpoint(checkpoint: str | None, which: str, config_path: str | None) -> Path:
    """The checkpoint the CLIs' --checkpoint / --which / --config_path name: a .ckpt, a run directory's best
    or last, or that of the config's run directory."""
    from utils.generation.checkpoints import CheckpointError, find_checkpoint

    if checkpoint:
        return find_checkpoint(checkpoint, which)
    if not config_path:
        raise CheckpointError("give --checkpoint (a .ckpt or run directory) or --config_path")
    return find_checkpoint(load_config(config_path).run_dir, which)
