"""Host syncs: the detector knows which ops read the device, and the sampler and the training step make none.

What a Lightning fit still reads back, per training step of the tiny config (found with the detector around
``Trainer.fit``, not fixed here; the test below checks the module's own step, without Lightning's loop):

- 1 per step: ``self.log("loss", ..., prog_bar=True)``. Lightning's logger connector turns every progress-bar
  metric into a Python number at the end of each batch (``convert_tensors_to_scalars``), whether or not a bar is
  shown.
- 1 per logged metric on each ``log_every_n_steps``-th step (9 in the tiny config: fm_loss, the contrastive
  terms, loss): the logger's ``metrics_to_scalars`` before writing. Only the first of these waits; the rest find
  the queue empty.
- Not syncs on a GPU, though the CPU stand-in flags them: the data pipeline's CPU tensors, and plain
  (non-fused) Adam's ``.item()`` of its CPU step counter. CUDA training uses fused Adam, whose counter lives on
  the device (:func:`utils.methods.base.use_fused_adam`); the test builds it that way.
"""

import pytest
import torch
from test_fast_paths import LABEL_VALUES, TINY, batch, tiny_module
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from utils.config import config_to_dict
from utils.methods import config_from_dict
from utils.methods.base import update_ema
from utils.methods.flow_matching.module import FlowMatchingModule
from utils.methods.host_syncs import SyncDetector
from utils.methods.ode_sampler import NFE_PER_STEP, sample
from utils.seeding import SampleNoise


def _ops(fn) -> list[str]:
    with SyncDetector("cpu") as detector:
        fn()
    return [s.op.split(".")[1] for s in detector.syncs]


def test_the_detector_flags_the_ops_that_read_the_device_and_nothing_else():
    x, mask, idx = torch.randn(6), torch.rand(6) > 0.5, torch.tensor([0, 2])
    assert _ops(lambda: x.sum().item()) == ["_local_scalar_dense"]
    assert _ops(lambda: bool(x.max() > 0)) == ["_local_scalar_dense"]
    assert _ops(lambda: x.nonzero()) == ["nonzero"]
    assert _ops(lambda: x[mask]) == ["index"]
    assert _ops(lambda: x.__setitem__(mask, 0.0)) == ["index_put_"]
    assert _ops(lambda: torch.equal(x, x)) == ["equal"]
    assert _ops(lambda: torch.unique(idx)) == ["_unique2"]
    assert _ops(lambda: torch.repeat_interleave(x, idx.repeat(3))) == ["repeat_interleave"]
    # the sync-free ways to say the same things
    assert _ops(lambda: (torch.where(mask, x, 0.0), x[idx], x.masked_fill(mask, 0.0), x.clamp(min=0),
                         torch.repeat_interleave(x, idx.repeat(3), output_size=6), x.repeat_interleave(2))) == []


def test_the_detector_ignores_other_devices_and_raises_when_strict():
    with SyncDetector("cuda") as detector:  # what a GPU run passes: host tensors do not count
        torch.ones(3).sum().item()
    assert detector.syncs == []
    with pytest.raises(RuntimeError, match="_local_scalar_dense"), SyncDetector("cpu", strict=True):
        torch.ones(3).sum().item()


@pytest.mark.parametrize("method", list(NFE_PER_STEP))
def test_a_sampling_solve_never_reads_the_device(method):
    """The whole generate path of the tiny config (prior + solve), and a class-conditional solve with guidance."""
    module = tiny_module().eval()
    mask = batch()["mask"]
    with SyncDetector("cpu", strict=True):
        images = module.generate(mask, SampleNoise(torch.arange(4), 0, (1, 32, 32)), 3, method)
    assert images.shape == mask.shape

    values = config_to_dict(TINY)
    values["conditioning_args"] = {"mode": "mask+class", "class_dropout": 0.2}
    values["sampling_args"]["guidance_scale"] = 2.0
    guided = FlowMatchingModule(config_from_dict(values), LABEL_VALUES, ["a", "b", "c"])
    adapter = guided.sampling_adapter()
    with SyncDetector("cpu") as detector:
        sample(adapter, torch.randn(4, 1, 32, 32), mask, 3, method, classes=torch.tensor([0, 1, 2, -1]))
    assert adapter.nfe == 2 * 3 * NFE_PER_STEP[method]
    # only F.one_hot's range checks (min, max .item()), which it makes on the CPU and skips on CUDA
    assert {s.where.split()[-1] for s in detector.syncs} <= {"class_context"}


def _ema_pair(decay: float):
    """A network with a buffer and two copies of its AveragedModel: torch's update and update_ema."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 2))
    return network, *(AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(decay)) for _ in range(2))


@pytest.mark.parametrize("decay", [0.999, 0.9])
def test_update_ema_is_averaged_models_update_bit_for_bit_without_syncs(decay):
    network, torch_ema, ours = _ema_pair(decay)
    for _ in range(4):  # the first update copies, the later ones average
        with torch.no_grad():
            for p in network.parameters():
                p.add_(torch.randn_like(p))
        network.train()(torch.randn(8, 5))  # moves BatchNorm's running statistics
        torch_ema.update_parameters(network)
        with SyncDetector("cpu", strict=True):
            update_ema(ours, network, decay)
        assert all(torch.equal(a, b) for a, b in zip(torch_ema.state_dict().values(), ours.state_dict().values()))
    assert int(ours.n_averaged) == 4


def test_a_training_step_never_reads_the_device():
    """Loss (flow matching + the contrastive term over the key bank), backward, gradient clipping, fused Adam and
    the EMA update, two steps (the second contrasts with the bank the first filled)."""
    module = tiny_module(train_args={"ema_decay": 0.999})
    module.train()
    optimizer = torch.optim.Adam(module.model.parameters(), lr=1e-3, fused=True)  # as on CUDA
    for step in range(2):
        with SyncDetector("cpu", strict=True), pytest.warns(UserWarning, match="self.log"):  # no Trainer: no logging
            loss = module.training_step(batch(), step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            update_ema(module.ema, module.model, 0.999)
    assert len(module.keys.bank["x_0"]) == 4 and int(module.ema.n_averaged) == 2
