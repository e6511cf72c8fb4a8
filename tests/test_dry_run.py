"""Dry runs: the estimate extrapolates one timed batch."""

import pytest
import torch

from utils.generation.generate import Generated
from utils.generation.plan import describe_samples, estimate_generation, extrapolate


@pytest.mark.parametrize("batch_seconds, batch_size, n, devices, expected", [
    (2.0, 4, 10, 1, 6.0),  # 3 batches, the last one partial but counted whole
    (2.0, 4, 10, 2, 4.0),  # 2 batches at a time: 2 rounds
    (2.0, 4, 3, 1, 2.0),  # one batch, smaller than asked
    (0.5, 8, 2000, 1, 125.0)])
def test_extrapolate_counts_whole_batches_over_the_devices(batch_seconds, batch_size, n, devices, expected):
    assert extrapolate(batch_seconds, batch_size, n, devices) == expected


def test_the_estimate_times_the_second_of_two_first_batches_and_extrapolates():
    calls = []

    def fake_generate(module, masks, ids, seed, num_steps, sampler, batch_size, devices, progress, classes):
        calls.append((len(masks), ids.tolist(), seed, num_steps, sampler, batch_size, devices, classes.tolist()))
        return Generated(torch.zeros(len(masks), 1, 2, 2), nfe=2 * num_steps, seconds=9.0 if len(calls) == 1 else 2.5)

    masks = torch.zeros(10, 1, 2, 2, dtype=torch.uint8)
    estimate = estimate_generation(None, masks, 7, 5, "midpoint", 4, ["cpu", "cpu"], generate_fn=fake_generate,
                                   classes=torch.arange(10))
    assert calls == [(4, [0, 1, 2, 3], 7, 5, "midpoint", 4, ["cpu"], [0, 1, 2, 3])] * 2  # warm-up, then timed
    assert (estimate.timed, estimate.batch_seconds, estimate.nfe) == (4, 2.5, 10)
    assert estimate.seconds == 5.0  # 3 batches of 4, 2 devices: 2 rounds of 2.5 s; the warm-up's 9 s not counted
    assert estimate.peak_bytes > 0 and "resident" in estimate.peak_kind  # on a CPU: the process's peak RSS
    assert estimate.lines()["estimate"].startswith("about 5.0 s for generation")


def test_describe_samples_counts_samples_per_mask():
    assert describe_samples(torch.arange(12) % 8, "X") == "12 samples of 8 masks (1-2 per mask) from X"
    assert describe_samples(torch.arange(8) % 4, "X") == "8 samples of 4 masks (2 per mask) from X"
