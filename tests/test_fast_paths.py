"""The fast paths compute what the plain paths compute, within stated tolerances (all on the CPU).

Tolerances (outputs of a randomised tiny network are O(1); images are in [0, 1]):
- SDPA vs MONAI's einsum attention, fp32: max |difference| <= 1e-5 (seen: 2e-7).
- Blocks compiled with torch.compile vs eager, fp32: max |difference| <= 1e-5 for the training loss and
  every gradient (aot_eager seen: 0; inductor may reorder float sums, 1e-4 allowed).
- The whole network compiled as one graph (aot_eager) vs eager: the same 1e-5; and no graph break in the tiny or
  the seed network's training forward (torch._dynamo.explain).
- bf16 autocast vs fp32: training loss within 1% relative (seen 0.03%), gradients within 2% relative L2
  (seen 0.2%); sampled images (10 Euler steps) max |difference| <= 1e-2 of the [0, 1] range (2.5 grey levels
  of 255; seen 2.6e-3), and the difference must be non-zero (autocast really ran).
"""

import copy
import dataclasses
import warnings

import pytest
import torch

from utils.config import ConfigError, config_to_dict
from utils.generation.generate import generate
from utils.methods import config_from_dict, load_config
from utils.methods.base import use_fused_adam
from utils.methods.flow_matching.module import FlowMatchingModule
from utils.methods.networks import (
    InputDtypeGroupNorm,
    build_model,
    compile_blocks,
    compile_network,
    count_parameters,
    low_precision_norms,
    repeated_blocks,
)
from utils.precision import autocast

TINY = load_config("configs/tiny.yaml")
LABEL_VALUES = [-0.8, -0.5, 0.6, -0.7]


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (at initialisation the output convolution is zero, and so is the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def tiny_module(**sections) -> FlowMatchingModule:
    values = config_to_dict(TINY)
    for section, keys in sections.items():
        values[section].update(keys)
    module = FlowMatchingModule(config_from_dict(values), LABEL_VALUES)
    randomise(module.model)
    return module


def inputs(b: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 1, 32, 32, generator=g), torch.rand(b, generator=g),
            torch.randint(0, 4, (b, 1, 32, 32), generator=g, dtype=torch.uint8))


def batch(b: int = 4) -> dict:
    x_t, _, mask = inputs(b, seed=2)
    return {"x_1": x_t.clamp(-1, 1), "mask": mask, "patient": torch.tensor([0, 0, 1, 2][:b]), "index": torch.arange(b)}


def loss_and_grads(module: FlowMatchingModule, precision: str = "32-true") -> tuple[torch.Tensor, torch.Tensor]:
    """One training step's loss (flow matching + contrastive: the tiny config has no warm-up) and gradients."""
    module.train()
    module.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # training_step draws t and eps
    with warnings.catch_warnings(), autocast(precision, "cpu"):
        warnings.simplefilter("ignore")  # self.log without a Trainer
        loss = module.training_step(batch(), 0)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in module.model.parameters() if p.grad is not None])
    return loss.detach(), grads


def test_sdpa_and_einsum_attention_agree_and_share_the_state_dict():
    sdpa = randomise(build_model(TINY.model_args, 4))
    einsum = build_model(dataclasses.replace(TINY.model_args, use_flash_attention=False), 4)
    einsum.load_state_dict(sdpa.state_dict(), strict=True)
    assert sdpa.unet.up_blocks[0].attentions[0].attn.use_flash_attention
    assert not einsum.unet.up_blocks[0].attentions[0].attn.use_flash_attention
    x_t, t, mask = inputs()
    with torch.no_grad():
        a, b = sdpa(x_t, t, mask), einsum(x_t, t, mask)
    assert a.abs().max() > 0.1  # a real signal, not the zero output of a fresh network
    assert (a - b).abs().max() <= 1e-5


def test_flash_attention_keeps_the_seed_network_and_its_parameter_names():
    seed = load_config("configs/comet_camus.yaml").model_args
    assert seed.use_flash_attention  # the default
    with torch.device("meta"):  # shapes only: builds the 94.5 M network instantly
        on, off = build_model(seed, 4), build_model(dataclasses.replace(seed, use_flash_attention=False), 4)
    assert count_parameters(on) == count_parameters(off) == 91_554_849
    with torch.device("meta"):  # the 23 self-attention output projections monai-generative never applies
        assert count_parameters(build_model(dataclasses.replace(seed, attention_out_proj=True), 4)) == 94_494_881
    assert {k: v.shape for k, v in on.state_dict().items()} == {k: v.shape for k, v in off.state_dict().items()}
    assert len(repeated_blocks(on)) == 17  # 5 down + mid + 5 up (UNet), 5 down + mid (ControlNet)


@pytest.mark.slow  # several seconds on a 2-core CPU; the fast subset keeps under 2 minutes
def test_compiled_blocks_give_the_eager_loss_and_gradients():
    eager, fast = tiny_module(), tiny_module()
    keys = list(fast.state_dict())
    assert compile_blocks(fast.model, backend="aot_eager") == 8  # traced graphs + AOT autograd, no codegen
    assert list(fast.state_dict()) == keys  # in place: checkpoints keep their parameter names
    (loss_e, grad_e), (loss_f, grad_f) = loss_and_grads(eager), loss_and_grads(fast)
    assert abs(loss_e - loss_f) <= 1e-5 and (grad_e - grad_f).abs().max() <= 1e-5


@pytest.mark.slow
def test_inductor_compiled_blocks_match_eager():
    eager, fast = tiny_module(), tiny_module()
    compile_blocks(fast.model)  # the default backend, as in training: generates and builds C++ kernels
    (loss_e, grad_e), (loss_f, grad_f) = loss_and_grads(eager), loss_and_grads(fast)
    assert abs(loss_e - loss_f) <= 1e-4 and (grad_e - grad_f).abs().max() <= 1e-4


def test_module_compiles_its_blocks_or_its_whole_network_only_when_configured():
    plain, blocks, full = (tiny_module(train_args={"compile": mode}) for mode in ("none", "blocks", "full"))
    for module in (plain, blocks, full):
        module.configure_model()
    assert all(b._compiled_call_impl is None for b in repeated_blocks(plain.model) + repeated_blocks(full.model))
    assert all(b._compiled_call_impl is not None for b in repeated_blocks(blocks.model))
    assert plain.model._compiled_call_impl is None and blocks.model._compiled_call_impl is None
    assert full.model._compiled_call_impl is not None
    assert list(plain.state_dict()) == list(blocks.state_dict()) == list(full.state_dict())


def _graph_breaks(model_args, size: int) -> tuple[int, int, list[str]]:
    """(graphs, graph breaks, their reasons) of one training-mode forward and backward of the network."""
    model = build_model(model_args, 4).train()
    x_t, t = torch.randn(2, 1, size, size), torch.rand(2)
    mask = torch.randint(0, 4, (2, 1, size, size), dtype=torch.uint8)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda *a: model(*a).square().mean())(x_t, t, mask)
    return explained.graph_count, explained.graph_break_count, [str(b.reason) for b in explained.break_reasons]


def test_the_tiny_network_is_one_graph_without_breaks():
    assert _graph_breaks(TINY.model_args, 32) == (1, 0, [])  # what train_args.compile: full asks of it


@pytest.mark.slow  # traces the 91.6 M network at 256 px
def test_the_seed_network_is_one_graph_without_breaks():
    assert _graph_breaks(load_config("configs/comet_camus.yaml").model_args, 256) == (1, 0, [])


@pytest.mark.slow
def test_the_fully_compiled_network_gives_the_eager_loss_and_gradients():
    eager, fast = tiny_module(), tiny_module()
    compile_network(fast.model, backend="aot_eager")  # the whole network, fullgraph: a break would raise
    (loss_e, grad_e), (loss_f, grad_f) = loss_and_grads(eager), loss_and_grads(fast)
    assert abs(loss_e - loss_f) <= 1e-5 and (grad_e - grad_f).abs().max() <= 1e-5


@pytest.mark.slow  # compiles (a cheap backend, but dynamo still traces three solves' worth of calls)
def test_compiled_sampling_gives_the_eager_images_from_one_graph(monkeypatch):
    """sampling_args.compile: full compiles the sampling network once, as one graph: batches of 4, 4 and a last
    one of 2 (padded to 4) trace a single shape, and the images are the eager ones."""
    shapes = []

    def counting(graph, example_inputs):  # a backend that records each graph it is given and runs it as traced
        shapes.append(tuple(example_inputs[0].shape))
        return graph.forward

    monkeypatch.setattr("utils.methods.base.compile_network", lambda net: compile_network(net, backend=counting))
    torch._dynamo.reset()
    eager, fast = tiny_module(), tiny_module(sampling_args={"compile": "full"})
    fast.load_state_dict(eager.state_dict())
    masks = torch.randint(0, 4, (10, 1, 32, 32), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)

    def images(module):
        return generate(module.eval(), masks, torch.arange(10), 0, 3, "euler", 4, ["cpu"], progress=False).images

    ref, got = images(eager), images(fast)
    assert len(shapes) == 1 and fast.model._compiled_call_impl is None  # a copy compiles: the module trains on
    assert 0.1 < ref.std() and (got - ref).abs().max() <= 1e-5


def test_only_the_ode_methods_compile_or_cast_their_sampling_network():
    sampling = load_config("configs/tiny.yaml", ["sampling_args.compile=full", "sampling_args.precision=bf16-true"])
    assert (sampling.sampling_args.compile, sampling.sampling_args.precision) == ("full", "bf16-true")
    for config in ("configs/spade_quickstart.yaml", "configs/ddpm_quickstart.yaml"):
        for key in ("sampling_args.compile=full", "sampling_args.precision=bf16-true"):
            with pytest.raises(ConfigError, match="sampling_args compile full and precision bf16-true are for the "
                                                  "ODE-sampled methods, not (spade|ddpm)"):
                load_config(config, [key])
    for key in ("train_args.channels_last=true", "model_args.low_precision_norm=true"):
        with pytest.raises(ConfigError, match="channels_last and model_args.low_precision_norm are for the UNet"):
            load_config("configs/spade_quickstart.yaml", [key])
    with pytest.raises(ConfigError, match="low_precision_norm needs bf16-mixed"):
        load_config("configs/quickstart.yaml", ["model_args.low_precision_norm=true", "train_args.precision=16-mixed"])


def test_channels_last_weights_give_the_nchw_loss_and_gradients():
    """train_args.channels_last: every convolution weight of the network and its EMA channels-last, the
    activations following them, and the NCHW loss and gradients (fp32, 1e-5)."""
    plain, fast = tiny_module(), tiny_module(train_args={"channels_last": True, "ema_decay": 0.9})
    fast.load_state_dict(plain.state_dict(), strict=False)  # the EMA copy is the only extra
    fast.configure_model()
    convs = [p for net in (fast.model, fast.ema.module) for p in net.parameters() if p.dim() == 4]
    assert fast._channels_last == len(convs) > 0
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not any(p.is_contiguous() for p in convs if p.shape[1] > 1 and p.shape[2] > 1)  # 1x1 kernels are both
    out = []
    fast.model.unet.out.register_forward_hook(lambda m, a, y: out.append(y))
    (loss_p, grad_p), (loss_f, grad_f) = loss_and_grads(plain), loss_and_grads(fast)
    assert out[0].is_contiguous(memory_format=torch.channels_last)
    assert abs(loss_p - loss_f) <= 1e-5 and (grad_p - grad_f).abs().max() <= 1e-5
    assert list(fast.state_dict()) == list(tiny_module(train_args={"ema_decay": 0.9}).state_dict())


def test_input_dtype_groupnorm_normalises_bf16_in_bf16_within_its_rounding():
    """At the shape of pytorch issue 140913 (128 channels, 32 groups, 64x64): a bf16 input under autocast gives a
    bf16 output and weight/bias gradients within bf16's rounding of fp32 GroupNorm on the same values."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 128, 64, 64, generator=g) * 3 + 1).bfloat16()
    plain = torch.nn.GroupNorm(32, 128)
    with torch.no_grad():
        plain.weight.copy_(torch.rand(128, generator=g) + 0.5), plain.bias.copy_(torch.randn(128, generator=g))
    fast = copy.deepcopy(plain)
    assert low_precision_norms(fast) == 1 and isinstance(fast, InputDtypeGroupNorm)
    upstream = torch.randn(2, 128, 64, 64, generator=g)

    def run(norm, x):
        norm.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x)
        (y.float() * upstream).sum().backward()
        return y, norm.weight.grad, norm.bias.grad

    (y32, w32, b32), (y16, w16, b16) = run(plain, x.float()), run(fast, x)
    assert y16.dtype == torch.bfloat16 and (y16.float() - y32).abs().max() <= 2 ** -7 * y32.abs().max()
    assert relative(w16, w32) <= 1e-2 and relative(b16, b32) <= 1e-2


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_low_precision_norm_keeps_the_network_and_its_bf16_step_within_tolerance():
    module = tiny_module(model_args={"low_precision_norm": True})
    norms = [m for m in module.model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(type(m) is InputDtypeGroupNorm for m in norms)
    assert list(module.state_dict()) == list(tiny_module().state_dict())
    (loss32, grad32), (loss16, grad16) = loss_and_grads(module), loss_and_grads(module, "bf16-mixed")
    assert abs(loss16 - loss32) <= 0.01 * loss32 and (grad16 - grad32).norm() <= 0.02 * grad32.norm()


def test_bf16_training_step_matches_fp32():
    module = tiny_module()
    (loss32, grad32), (loss16, grad16) = loss_and_grads(module), loss_and_grads(module, "bf16-mixed")
    assert abs(loss16 - loss32) <= 0.01 * loss32
    assert (grad16 - grad32).norm() <= 0.02 * grad32.norm()
    assert not torch.equal(grad16, grad32)  # bf16 really ran


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_sampling_matches_fp32(precision):
    masks = inputs()[2]
    plain = tiny_module()
    fast = tiny_module(sampling_args={"precision": precision})
    fast.load_state_dict(plain.state_dict())

    def images(module):
        return generate(module.eval(), masks, torch.arange(4), 0, 10, "euler", 4, ["cpu"], progress=False).images

    ref, got = images(plain), images(fast)
    assert 0.1 < ref.std()  # images, not a constant
    assert 0 < (got - ref).abs().max() <= 1e-2


def test_bf16_weights_sample_like_fp32_with_the_state_and_time_in_fp32():
    """sampling_args.precision: bf16-true samples with a bfloat16 copy of the network: the images within the
    mixed-precision tolerance of fp32 (and not equal), the network given bf16 images and fp32 times, the ODE
    state fp32, the module's own weights untouched."""
    masks = inputs()[2]
    plain = tiny_module()
    fast = tiny_module(sampling_args={"precision": "bf16-true"})
    fast.load_state_dict(plain.state_dict())
    seen = []
    fast.model.register_forward_pre_hook(lambda net, args: seen.append((args[0].dtype, args[1].dtype)))

    def images(module):
        return generate(module.eval(), masks, torch.arange(4), 0, 10, "euler", 4, ["cpu"], progress=False).images

    ref, got = images(plain), images(fast)
    assert 0.1 < ref.std() and 0 < (got - ref).abs().max() <= 1e-2
    assert got.dtype == torch.float32 and next(fast.model.parameters()).dtype == torch.float32
    assert seen == [(torch.bfloat16, torch.float32)] * 10  # the copy (hooks and all) ran the 10 steps
    randomise(fast.model, seed=5)  # training went on: the next call samples with the new weights
    fresh = tiny_module(sampling_args={"precision": "bf16-true"})
    fresh.load_state_dict(fast.state_dict())
    assert torch.equal(images(fast), images(fresh)) and len(seen) == 20  # the same copy, refreshed


def test_fused_adam_only_on_cuda_and_never_with_fp16_clipping():
    assert use_fused_adam(True, "bf16-mixed", 1.0) and use_fused_adam(True, "32-true", 1.0)
    assert use_fused_adam(True, "16-mixed", 0.0)  # no clipping: the scaler may unscale inside the step
    assert not use_fused_adam(True, "16-mixed", 1.0)  # Lightning must unscale before clipping
    assert not use_fused_adam(False, "bf16-mixed", 1.0)


def test_bf16_training_clips_a_fused_adam(monkeypatch):
    """Lightning's MixedPrecision plugin refuses to clip a fused optimizer under bf16 (an H200 run crashed on it);
    the method clips by itself, so a fused Adam trains under bf16-mixed and its gradients are clipped to the limit."""
    import pytorch_lightning as pl

    monkeypatch.setattr("utils.methods.base.use_fused_adam", lambda *args: True)  # fused on the CPU too
    module, clip, norms = tiny_module(contrastive_args={"weight": 0.0}), 1e-4, []  # plain loaders: no patients

    class ClippedNorms(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            optimizer = trainer.optimizers[0]
            assert optimizer.defaults["fused"]
            optimizer.register_step_post_hook(lambda opt, *_: norms.append(torch.nn.utils.get_total_norm(
                [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]).item()))

    samples = [{k: v[i] for k, v in batch().items()} for i in range(4)] * 2
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", gradient_clip_val=clip, max_steps=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[ClippedNorms()])
    trainer.fit(module, torch.utils.data.DataLoader(samples, batch_size=4))
    assert norms == pytest.approx([clip, clip], rel=1e-3)  # the raw gradients are far larger than 1e-4
