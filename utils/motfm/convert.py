"""A MOTFM run (its Lightning checkpoint and YAML) as a COMET checkpoint and config.

MOTFM (milad1378yz/MOTFM) saves ``state_dict`` keys ``model.unet.*`` and ``model.controlnet.*`` in
monai-generative 0.2.3's layout; :func:`load_old` maps them onto MONAI core's names strictly (MONAI's own
``load_old_state_dict`` cannot map a ControlNet's self-attention and drops what it does not map). Its YAML
maps onto :class:`utils.config.Config` as the README's "Coming from MOTFM" table says. What MOTFM did that
this framework does not, the imported checkpoint records
(hyperparameter ``motfm``): time floored to integer steps, floor(t * 999), and images min-max normalised by the
training split's extremes (``image_range``, in the dataset's [0, 1] units), so outputs map back to images.
Anything that cannot be mapped stops with a :class:`MotfmError` naming it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from utils.config import config_to_dict
from utils.files import load_torch_file
from utils.methods import config_from_dict, method_class

# MOTFM model_args -> ours (the same name unless given); keys not here and not in _MOTFM_ONLY are refused.
_MODEL_KEYS = {"num_channels": "channels", "num_res_blocks": "num_res_blocks",
               "attention_levels": "attention_levels", "num_head_channels": "num_head_channels",
               "norm_num_groups": "norm_num_groups", "resblock_updown": "resblock_updown",
               "transformer_num_layers": "transformer_num_layers", "use_flash_attention": "use_flash_attention",
               "conditioning_embedding_num_channels": "conditioning_embedding_num_channels"}
_MOTFM_ONLY = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "max_timestep": 1000}
# What MOTFM's networks take for a key its YAML leaves out: monai-generative 0.2.3's DiffusionModelUNet and
# ControlNet defaults (an int num_res_blocks / num_head_channels applies to every level).
PEER_DEFAULTS = {"num_res_blocks": (2, 2, 2, 2), "num_channels": (32, 64, 64, 64),
                 "attention_levels": (False, False, True, True), "norm_num_groups": 32, "resblock_updown": False,
                 "num_head_channels": 8, "transformer_num_layers": 1, "use_flash_attention": False,
                 "conditioning_embedding_num_channels": (16, 32, 96, 256)}
_CONDITION_KEYS = ("with_conditioning", "mask_conditioning", "cross_attention_dim")
# MOTFM's normalisation options this import reproduces (the first is MOTFM's default).
_NORMALISATION = {"image_norm": ("minmax_0_1", "minmax"), "mask_norm": ("minmax_0_1", "minmax"),
                  "norm_scope": ("global",), "clip_percentiles": (None,)}


class MotfmError(ValueError):
    """A MOTFM run that cannot be imported; the message names the key or file."""


def motfm_mode(model_args: dict) -> str:
    """conditioning_args.mode of MOTFM's with_conditioning (class) and mask_conditioning (mask)."""
    mask, cls = bool(model_args.get("mask_conditioning", False)), bool(model_args.get("with_conditioning", False))
    return {(True, True): "mask+class", (True, False): "mask", (False, True): "class"}.get((mask, cls),
                                                                                         "unconditional")


def motfm_solver(solver: dict) -> tuple[int, str]:
    """Steps and sampler MOTFM's inferer.py takes from ``solver_args``: ``method`` (default midpoint) with
    ``step_size`` (default 1 / ``time_points``, whose default is 10)."""
    step_size = solver.get("step_size") or 1.0 / float(solver.get("time_points") or 10)
    return max(round(1.0 / float(step_size)), 1), str(solver.get("method", "midpoint"))


def peer_model_args(model: dict, source: str) -> dict:
    """MOTFM's ``model_args`` with monai-generative's defaults for what it leaves out, per-level ints expanded; a
    left-out per-level key whose default does not fit the levels is named."""
    full = {**PEER_DEFAULTS, **model}
    levels = len(full["num_channels"])
    for key in ("num_res_blocks", "num_head_channels"):
        if isinstance(full[key], int):
            full[key] = [full[key]] * levels
    for key in ("num_res_blocks", "attention_levels", "num_head_channels"):
        if key not in model and len(full[key]) != levels:
            raise MotfmError(f"{source}: model_args.{key} is not given, and monai-generative's default "
                             f"{list(PEER_DEFAULTS[key])} (what MOTFM would build) has {len(full[key])} entries "
                             f"for the {levels} levels of num_channels: give model_args.{key}")
    return full


def translate_config(motfm: dict, run_dir: Path, num_labels: int, image_size: int, source: str) -> dict:
    """Our config dict for MOTFM's YAML ``motfm`` (validated); ``run_dir`` becomes output_dir/run_name."""
    model = dict(motfm.get("model_args") or {})
    for key, required in _MOTFM_ONLY.items():
        if key in model and model[key] != required:
            raise MotfmError(f"{source}: model_args.{key} is {model[key]!r}; only {required} can be imported")
    unknown = sorted(set(model) - set(_MODEL_KEYS) - set(_MOTFM_ONLY) - set(_CONDITION_KEYS) - {"dropout_cattn"})
    if unknown:
        raise MotfmError(f"{source}: model_args.{unknown[0]} has no counterpart here (mappable: "
                         f"{', '.join(sorted(_MODEL_KEYS))})")
    mode = motfm_mode(model)
    model = peer_model_args(model, source)
    if "class" in mode and not model.get("cross_attention_dim"):
        raise MotfmError(f"{source}: model_args.with_conditioning needs cross_attention_dim (the number of classes)")
    data, train, solver = motfm.get("data_args") or {}, motfm.get("train_args") or {}, motfm.get("solver_args") or {}
    if "pickle_path" not in data:
        raise MotfmError(f"{source}: data_args.pickle_path is missing")
    for key, supported in _NORMALISATION.items():  # the image range recorded at import is a global min-max's
        if data.get(key, supported[0]) not in supported:
            raise MotfmError(f"{source}: data_args.{key} {data[key]!r} cannot be imported (only "
                             f"{', '.join(map(str, supported))}: a min-max of the whole training split)")
    num_steps, sampler = motfm_solver(solver)
    batch = int(train.get("batch_size", 1))
    values = {
        "run_name": run_dir.name, "output_dir": str(run_dir.parent), "method": "flow_matching",
        "data_args": {"path": str(data["pickle_path"]), "num_classes": num_labels, "image_size": image_size},
        "model_args": {**{ours: model[theirs] for theirs, ours in _MODEL_KEYS.items() if theirs in model},
                       "attention_out_proj": "class" in mode},  # self-attention as monai-generative: no proj_attn
        "conditioning_args": {"mode": mode},
        "prior_args": {"alpha": 0.0},
        "contrastive_args": {"weight": 0.0},  # off: its keys are the recipe's, not MOTFM's batch (often 1)
        "train_args": {"batch_size": batch, "effective_batch_size": batch, "precision": "32-true",
                       "max_epochs": int(train.get("num_epochs", 200)), "lr": float(train.get("lr", 1e-4)),
                       "seed": int(train.get("seed", 42)),
                       "sample_every_n_epochs": int(train.get("val_freq", 10)),
                       "checkpoint_every_n_epochs": int(train.get("val_freq", 10)),
                       "num_sample_images": int(train.get("num_val_samples", 8))},
        "sampling_args": {"num_steps": num_steps, "sampler": sampler},
    }
    return config_to_dict(config_from_dict(values, source))


def split_state_dict(ckpt, source: str) -> tuple[dict, dict]:
    """The UNet's and the ControlNet's tensors (old names) of a MOTFM checkpoint dict or bare state dict."""
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("model.unet.") for k in state):
        raise MotfmError(f"{source}: no model.unet.* weights; expected a MOTFM Lightning checkpoint")
    parts: dict[str, dict] = {"unet": {}, "controlnet": {}}
    for key, value in state.items():
        owner, _, rest = key.removeprefix("model.").partition(".")
        if owner not in parts or not key.startswith("model."):
            raise MotfmError(f"{source}: weight {key} belongs to neither model.unet nor model.controlnet")
        parts[owner][rest] = value
    return parts["unet"], parts["controlnet"]


def old_name(key: str, old: dict) -> str | None:
    """monai-generative 0.2.3's name of MONAI core's ``key``, among the names in ``old``: a self-attention block's
    ``attn.to_q``/``attn.out_proj`` were ``to_q``/``proj_attn``, a transformer's ``out_proj`` was ``to_out.0``,
    an upsampler's ``postconv`` was ``conv``."""
    candidates = (key, key.replace("postconv", "conv"), key.replace(".attn.to_", ".to_"),
                  key.replace(".attn.out_proj.", ".proj_attn."), key.replace(".out_proj.", ".to_out.0."))
    return next((c for c in candidates if c in old), None)


def load_old(network: torch.nn.Module, old: dict, what: str, source: str) -> None:
    """Load monai-generative 0.2.3 weights ``old`` into ``network``: every tensor of the network from its old
    name, and every old tensor used, except the self-attention blocks' ``proj_attn``, which monai-generative never
    applies, when the network has no such projection (``model_args.attention_out_proj: false``)."""
    state, unused = {}, dict(old)
    for key, value in network.state_dict().items():
        name = old_name(key, unused)
        if name is None:
            raise MotfmError(f"{source}: the {what}'s weights do not map onto the translated network (no old "
                             f"tensor for {key}): the YAML does not describe this checkpoint")
        state[key] = unused.pop(name)
        if state[key].shape != value.shape:
            raise MotfmError(f"{source}: the {what}'s {name} has shape {list(state[key].shape)}, the translated "
                             f"network's {key} {list(value.shape)}: the YAML does not describe this checkpoint")
    left = [k for k in unused if ".proj_attn." not in k]
    if left:
        raise MotfmError(f"{source}: the {what}'s {left[0]} (and {len(left) - 1} more) has no place in the "
                         "translated network: the YAML does not describe this checkpoint")
    network.load_state_dict(state)


def in_class_order(old: dict, class_values, k: int, source: str) -> dict:
    """``old`` with the class context's columns in class order. MOTFM feeds one-hot(class_values.index(c)) for a
    record of class c; here class c is one-hot(c), so the cross-attention's key and value weights, the only
    layers the context enters, take MOTFM's column class_values.index(c) as column c."""
    if not class_values:
        return old
    if sorted(class_values) != list(range(k)):
        raise MotfmError(f"{source}: data_args.class_values {list(class_values)} must be the classes 0..{k - 1} "
                         f"(in any order; model_args.cross_attention_dim is {k})")
    columns = [list(class_values).index(c) for c in range(k)]
    return {name: w[:, columns] if name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) else w
            for name, w in old.items()}


def import_run(checkpoint: str | Path, config: dict, run_dir: Path, num_labels: int, image_size: int,
               image_range: tuple[float, float], class_names: list[str] | None, time_floor: bool,
               config_source: str) -> tuple[dict, dict]:
    """Our checkpoint dict and config dict for a MOTFM checkpoint and its parsed YAML ``config``."""
    from utils.data.datamodule import scaled_label_values

    values = translate_config(config, run_dir, num_labels, image_size, config_source)
    ckpt = load_torch_file(checkpoint, "a MOTFM checkpoint", MotfmError)
    unet, controlnet = split_state_dict(ckpt, str(checkpoint))
    uses_class = "class" in values["conditioning_args"]["mode"]
    if uses_class:
        k = int(config["model_args"]["cross_attention_dim"])
        class_names = class_names or [str(i) for i in range(k)]
        if len(class_names) != k:
            raise MotfmError(f"{config_source}: model_args.cross_attention_dim is {k} but {len(class_names)} class "
                             f"names were given ({', '.join(class_names)})")
    labels = [round(float(v), 6) for v in scaled_label_values(num_labels)]  # unused: the prior is noise (alpha 0)
    motfm = {"time_floor": time_floor, "image_range": [float(image_range[0]), float(image_range[1])]}
    module = method_class("flow_matching")(config_from_dict(values, config_source), labels,
                                           class_names if uses_class else None, motfm)
    if uses_class:
        unet, controlnet = (in_class_order(part, config["data_args"].get("class_values"), k, config_source)
                            for part in (unet, controlnet))
    load_old(module.model.unet, unet, "UNet", str(checkpoint))
    if module.model.controlnet is None:
        if controlnet:
            raise MotfmError(f"{checkpoint}: has ControlNet weights but {config_source} has no mask_conditioning")
    else:
        load_old(module.model.controlnet, controlnet, "ControlNet", str(checkpoint))
    out = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
           "epoch": int(ckpt.get("epoch", 0)), "global_step": int(ckpt.get("global_step", 0)),
           "motfm_source": str(Path(checkpoint).resolve())}
    return out, values
