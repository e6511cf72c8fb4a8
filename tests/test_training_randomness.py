"""Per-rank random streams, the contrastive key set, and a resume that continues the uninterrupted run."""

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

import trainer
import utils.methods.flow_matching.contrastive_keys as contrastive_keys
from losses.contrastive_flow import info_nce_from_cosines
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
    assert len(first.x_0) == 4 and first.positive.tolist() == [0, 1, 2, 3]  # nothing earlier yet
    second = keys(*batches[1])
    assert torch.equal(second.x_0, torch.cat([batches[1][0], batches[0][0]]))  # current first, then the bank
    assert second.patient.tolist() == [10, 11, 12, 13, 0, 1, 2, 3] and second.positive.tolist() == [0, 1, 2, 3]
    third = keys(*batches[2])
    assert third.patient.tolist() == [20, 21, 22, 23, 10, 11, 12, 13]  # the oldest left the bank
    restored = ContrastiveKeys(num_keys=8)
    restored.load_state_dict(keys.state_dict())
    assert torch.equal(restored(*batches[0]).x_1, keys(*batches[0]).x_1)


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
