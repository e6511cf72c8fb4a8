"""Per-rank random streams, the contrastive key set, and a resume that continues the uninterrupted run."""

import copy
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

import trainer
import utils.methods.flow_matching.contrastive_keys as contrastive_keys
from losses.contrastive_flow import contrastive_velocity_loss, info_nce_from_cosines
from utils.config import ConfigError
from utils.methods import load_config
from utils.methods.flow_matching.contrastive_keys import ContrastiveKeys, valid_keys
from utils.methods.flow_matching.module import FlowMatchingModule


def _train(tmp, data, **extra) -> Path:
    args = ["--config_path", "configs/tiny.yaml"]
    for s in tiny_overrides(tmp, **{"data_args.path": data, **extra}):
        args += ["--set", s]
    assert trainer.main(args) == 0
    return tmp / "runs" / extra.get("run_name", "tiny")


def test_two_ranks_draw_different_t_and_noise_and_epochs_differ():
    module = FlowMatchingModule(load_config("configs/tiny.yaml"), [0.0, -0.5, 0.5, -0.4])
    x_1 = torch.zeros(4, 1, 32, 32)
    draws = {}
    for rank in (0, 1):
        module._trainer = type("T", (), {"global_rank": rank, "current_epoch": 0})()
        draws[rank] = module.training_draws(x_1, batch_idx=0)
    module._trainer = None
    assert not torch.equal(draws[0][0], draws[1][0]) and not torch.equal(draws[0][1], draws[1][1])
    again = module.training_draws(x_1, batch_idx=0)  # rank 0, epoch 0, batch 0 again: the same stream
    assert torch.equal(again[0], draws[0][0]) and torch.equal(again[1], draws[0][1])


def test_key_bank_tops_up_one_process_to_num_keys():
    keys = ContrastiveKeys(num_keys=8)
    batches = [(torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2), torch.arange(4) + 10 * k) for k in range(3)]
    first = keys(*batches[0])
    assert len(first.x_0) == 8 and first.positive.tolist() == [0, 1, 2, 3]  # M rows from the first step
    assert first.filled.tolist() == [True] * 4 + [False] * 4 and first.patient.tolist()[4:] == [-1] * 4
    storage = keys.bank["x_0"].data_ptr()
    second = keys(*batches[1])
    assert torch.equal(second.x_0, torch.cat([batches[1][0], batches[0][0]]))  # current first, then the bank
    assert second.patient.tolist() == [10, 11, 12, 13, 0, 1, 2, 3] and second.positive.tolist() == [0, 1, 2, 3]
    assert second.filled.all()
    third = keys(*batches[2])
    assert third.patient.tolist() == [20, 21, 22, 23, 10, 11, 12, 13]  # the oldest left the bank
    assert keys.bank["x_0"].data_ptr() == storage  # updated in place: a captured graph's buffer stays valid
    restored = ContrastiveKeys(num_keys=8)
    restored.load_state_dict(keys.state_dict())
    assert torch.equal(restored(*batches[0]).x_1, keys(*batches[0]).x_1)


def test_a_bank_saved_before_it_had_a_fixed_size_loads_padded():
    old = {"x_0": torch.ones(2, 1, 2, 2), "x_1": torch.ones(2, 1, 2, 2), "patient": torch.tensor([5, 6])}
    keys = ContrastiveKeys(num_keys=8)
    keys.load_state_dict(old)  # 2 keys seen of the 4 the bank holds
    got = keys(torch.zeros(4, 1, 2, 2), torch.zeros(4, 1, 2, 2), torch.arange(4))
    assert got.patient.tolist() == [0, 1, 2, 3, 5, 6, -1, -1]
    assert got.filled.tolist() == [True] * 6 + [False] * 2


@pytest.mark.parametrize("target", ["velocity", "same_noise", "denoised"])
def test_empty_bank_slots_change_nothing_in_the_loss(target):
    """The first step's M rows, half of them empty slots, give the loss of the filled keys alone (what the
    bank gave before it had a fixed size), and their gradient."""
    g = torch.Generator().manual_seed(0)
    x_0, x_1, v = (torch.randn(4, 1, 3, 3, generator=g) for _ in range(3))
    t, patient = torch.rand(4, generator=g), torch.tensor([0, 0, 1, -1])
    keys = ContrastiveKeys(num_keys=8)(x_0, x_1, patient)
    grads = []
    for k_0, k_1, k_patient, filled in ((keys.x_0, keys.x_1, keys.patient, keys.filled),
                                        (x_0, x_1, patient, torch.ones(4, dtype=torch.bool))):
        v_ = v.clone().requires_grad_(True)
        valid = filled.expand(4, -1) & valid_keys(patient, k_patient)
        out = contrastive_velocity_loss(target, v_, x_0, x_0 + v, t, k_0, k_1, keys.positive, 0.07, valid)
        out.loss.backward()
        grads.append((out.loss, out.valid_keys, out.chance, out.neg_cos, v_.grad))
    for full, subset in zip(*grads):
        torch.testing.assert_close(full, subset, rtol=1e-6, atol=1e-7)


def test_step_draws_are_the_seed_rank_epoch_batch_streams():
    """t and eps come from the stream SeedSequence([seed, rank, epoch, batch]) seeds, the dropout draws from
    the same entropy plus stream 1, bit for bit (a resumed or re-run step draws the same numbers)."""
    module = FlowMatchingModule(load_config("configs/tiny.yaml", ["conditioning_args.mask_dropout=0.5"]),
                                [0.0, -0.5, 0.5, -0.4])
    x_1 = torch.zeros(4, 1, 32, 32)
    draws = module.step_draws(x_1, batch_idx=3)

    def stream(*entropy):
        seed = int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0] >> 1)
        return torch.Generator().manual_seed(seed)

    g = stream(0, 0, 0, 3)  # tiny.yaml's seed 0, rank 0, epoch 0, batch 3
    assert torch.equal(draws.t, torch.rand(4, generator=g))
    assert torch.equal(draws.eps, torch.randn(4, 1, 32, 32, generator=g))
    g = stream(0, 0, 0, 3, 1)
    torch.rand(4, 4, generator=g)  # the per-label draws: no label dropout here, so only the background...
    keep_mask = torch.rand(4, 1, generator=g) >= 0.5  # ...and the whole mask decide
    assert torch.equal(draws.labels_kept, keep_mask.expand(4, 4)) and draws.drop_class is None


def test_the_training_step_is_a_function_of_its_draws(tiny_data):
    """training_step draws, then computes step_loss(batch, draws): the same loss from the same draws on a copy
    of the module (weights and key bank), another from other draws."""
    cfg = load_config("configs/tiny.yaml", [f"data_args.path={tiny_data}", "conditioning_args.mask_dropout=0.5"])
    module = FlowMatchingModule(cfg, [0.0, -0.5, 0.5, -0.4])
    module.log_dict = module.log = lambda *a, **k: None
    g = torch.Generator().manual_seed(1)
    batch = {"x_1": torch.rand(4, 1, 32, 32, generator=g) * 2 - 1, "patient": torch.tensor([0, 1, 1, 2]),
             "mask": torch.randint(0, 4, (4, 1, 32, 32), generator=g, dtype=torch.uint8)}
    twin, triplet = copy.deepcopy(module), copy.deepcopy(module)
    loss = module.training_step(batch, batch_idx=5)
    same, logs = twin.step_loss(batch, twin.step_draws(batch["x_1"], batch_idx=5))
    assert torch.equal(loss, same) and logs["train/nce_valid_keys"].item() <= 4  # half the bank is empty
    other, _ = triplet.step_loss(batch, triplet.step_draws(batch["x_1"], batch_idx=6))  # same bank, other draws
    assert not torch.equal(other, same)


def test_many_ranks_contrast_within_groups_of_num_keys(monkeypatch):
    b, world, rank = 4, 8, 5
    gathered = {"x": torch.arange(b * world, dtype=torch.float32).view(-1, 1, 1, 1)}

    def fake_gather(x):  # as if 8 ranks of 4 samples were gathered; this process is rank 5
        full = gathered["x"].expand(-1, *x.shape[1:]).to(x.dtype) if x.ndim > 1 else gathered["x"].flatten()
        return full.to(x.dtype), rank * b

    monkeypatch.setattr(contrastive_keys, "gather_no_grad", fake_gather)
    keys = ContrastiveKeys(num_keys=16)(torch.zeros(b, 1, 1, 1), torch.zeros(b, 1, 1, 1), torch.zeros(b))
    assert keys.patient.tolist() == list(range(16, 32))  # ranks 4-7 form this rank's group
    assert keys.positive.tolist() == [4, 5, 6, 7] and keys.patient[keys.positive].tolist() == [20, 21, 22, 23]
    with pytest.raises(ValueError, match=r"num_keys \(12\) must divide the 32 samples"):
        ContrastiveKeys(num_keys=12)(torch.zeros(b, 1, 1, 1), torch.zeros(b, 1, 1, 1), torch.zeros(b))


def test_num_keys_must_be_whole_micro_batches():
    with pytest.raises(ConfigError, match="contrastive_args.num_keys must be a multiple of train_args.batch_size"):
        load_config("configs/tiny.yaml", ["contrastive_args.num_keys=6"])


def test_valid_keys_and_chance_count_only_usable_keys():
    anchor, key = torch.tensor([7, 7, -1]), torch.tensor([7, 7, 3, 5])
    valid = valid_keys(anchor, key)
    assert valid.tolist() == [[False, False, True, True], [False, False, True, True], [True] * 4]
    out = info_nce_from_cosines(torch.zeros(3, 4), torch.tensor([0, 1, 2]), 0.1, valid)
    # anchors 0 and 1 keep their positive and 2 negatives (3 keys); anchor 2 keeps all 4
    assert out.valid_keys.item() == pytest.approx(10 / 3)
    assert out.chance.item() == pytest.approx((2 * math.log(3) + math.log(4)) / 3)
    assert out.loss.item() == pytest.approx(out.chance.item(), abs=1e-6)  # equal cosines: the chance level


def _rows(run_dir, name="metrics.csv"):
    with open(run_dir / "csv" / name) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_resume_continues_exactly_as_the_uninterrupted_run(tmp_path, tiny_data):
    common = {"train_args.ema_decay": 0.9, "contrastive_args.warmup_epochs": 1, "train_args.max_epochs": 2}
    whole = _train(tmp_path, tiny_data, run_name="whole", **common)
    _train(tmp_path, tiny_data, run_name="split", **{**common, "train_args.max_epochs": 1})
    split = _train(tmp_path, tiny_data, run_name="split", **common)  # resumes across the warm-up boundary
    a = torch.load(whole / "last.ckpt", weights_only=True)
    b = torch.load(split / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    for key, value in a["state_dict"].items():  # model and EMA weights
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    for (_, sa), (_, sb) in zip(sorted(a["optimizer_states"][0]["state"].items()),
                                sorted(b["optimizer_states"][0]["state"].items())):
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=0, atol=1e-9)
    before = _rows(split, "metrics_to_step0000004.csv")  # kept, not deleted by the CSV logger
    weights = [float(r["train/nce_weight"]) for r in before + _rows(split) if r.get("train/nce_weight")]
    assert weights == pytest.approx([0.0] * 4 + [0.01] * 4)  # the first resumed step is past the warm-up


class RecordingKeys(ContrastiveKeys):
    def __init__(self, num_keys, out):
        super().__init__(num_keys)
        self.out, self.calls = out, 0

    def __call__(self, x_0, x_1, patient):
        keys = super().__call__(x_0, x_1, patient)
        rank = torch.distributed.get_rank()
        torch.save({"x_0": x_0, "anchor_patient": patient, "key_patient": keys.patient,
                    "positive": keys.positive}, f"{self.out}/keys{rank}_{self.calls}.pt")
        self.calls += 1
        return keys


class RecordingModule(FlowMatchingModule):
    def __init__(self, config, label_values, out):
        super().__init__(config, label_values)
        self.keys, self.out = RecordingKeys(self.cfg.contrastive_args.num_keys, out), out

    def training_draws(self, x_1, batch_idx):
        t, eps = super().training_draws(x_1, batch_idx)
        torch.save({"t": t, "eps": eps}, f"{self.out}/draws{self.global_rank}_{batch_idx}.pt")
        return t, eps


@pytest.mark.slow
def test_ddp_ranks_draw_their_own_noise_and_see_each_others_keys(tmp_path, tiny_data):
    import pytorch_lightning as pl

    from utils.data.datamodule import EchoDataModule

    cfg = load_config("configs/tiny.yaml", [f"data_args.path={tiny_data}"])
    dm = EchoDataModule(cfg.data_args, 4, 0)
    module = RecordingModule(cfg, dm.label_values("mean_intensity"), str(tmp_path))
    pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
               enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
               num_sanity_val_steps=0).fit(module, datamodule=dm)
    for step in (0, 1):
        d0, d1 = (torch.load(tmp_path / f"draws{r}_{step}.pt") for r in (0, 1))
        assert not torch.equal(d0["t"], d1["t"]) and not torch.equal(d0["eps"], d1["eps"])
    cross_rank_pairs = 0
    for step in (0, 1):
        k0, k1 = (torch.load(tmp_path / f"keys{r}_{step}.pt") for r in (0, 1))
        for rank, k in enumerate((k0, k1)):
            assert k["positive"].tolist() == [4 * rank + i for i in range(4)]  # offset by the rank
            assert torch.equal(k["key_patient"], torch.cat([k0["anchor_patient"], k1["anchor_patient"]]))
        other = k1["anchor_patient"]
        cross_rank_pairs += int((k0["anchor_patient"][:, None] == other[None, :]).sum())
        valid = valid_keys(k0["anchor_patient"], k0["key_patient"])
        assert not valid[:, 4:][k0["anchor_patient"][:, None] == other[None, :]].any()  # same patient on rank 1
    assert cross_rank_pairs > 0  # the batches did put one patient on both ranks
