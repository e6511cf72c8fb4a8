"""Each conditioning mode trains, saves, reloads from its checkpoint alone and generates through inferer.py on the
tiny config; checkpoints written before the modes existed still load and make the same images."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

import inferer
import trainer
from utils.data.dataset_io import load_dataset
from utils.data.layout import VIEW_PHASE_CLASSES
from utils.generation.checkpoints import find_checkpoint
from utils.methods import load_module

MODES = {
    "class": ["conditioning_args.mode=class", "prior_args.alpha=0", "conditioning_args.class_dropout=0.2"],
    "mask+class": ["conditioning_args.mode=mask+class", "conditioning_args.mask_input=one_hot",
                   "conditioning_args.mask_dropout=0.2", "conditioning_args.label_dropout=0.3",
                   "conditioning_args.class_dropout=0.2"],
    "unconditional": ["conditioning_args.mode=unconditional", "prior_args.alpha=0"],
}


def _train(tmp, data, sets) -> object:
    args = ["--config_path", "configs/tiny.yaml"]
    for s in tiny_overrides(tmp, **{"data_args.path": data, "train_args.max_epochs": 1}) + sets:
        args += ["--set", s]
    assert trainer.main(args) == 0
    return tmp / "runs" / "tiny"


@pytest.fixture(scope="module", params=list(MODES))
def mode_run(request, tmp_path_factory, tiny_data):
    return request.param, _train(tmp_path_factory.mktemp(request.param.replace("+", "_")), tiny_data,
                                 MODES[request.param])


def _infer(run, out, *extra):
    assert inferer.main(["--checkpoint", str(run), "--which", "last", "--num_samples", "5", "--output_dir",
                         str(out), *extra]) == 0
    return np.load(out / "samples.npz"), json.loads((out / "manifest.json").read_text())


@pytest.mark.slow
def test_each_mode_trains_reloads_from_the_checkpoint_alone_and_generates(mode_run, tiny_data, tmp_path):
    mode, run = mode_run
    module = load_module(find_checkpoint(run, "last"))
    assert module.cfg.conditioning_args.mode == mode
    assert module.class_names == (list(VIEW_PHASE_CLASSES) if "class" in mode else [])
    assert (module.model.controlnet is not None) == ("mask" in mode)
    samples, manifest = _infer(run, tmp_path / "split")
    assert samples["images"].shape == (5, 1, 32, 32) and np.isfinite(samples["images"]).all()
    assert manifest["nfe_per_image"] == 3 and manifest["guidance_scale"] == 1.0
    if "class" in mode:  # by default each image takes its source record's class
        test = load_dataset(tiny_data)["test"]
        assert samples["classes"].tolist() == [test[i % len(test)]["class"] for i in range(5)]
        assert manifest["class_names"] == list(VIEW_PHASE_CLASSES)
        one, _ = _infer(run, tmp_path / "one", "--class", "4CH_ES")
        assert one["classes"].tolist() == [3] * 5
        assert inferer.main(["--checkpoint", str(run), "--which", "last", "--num_samples", "3", "--class", "2CH_ES",
                             "--export", str(tmp_path / "synth.npz")]) == 0
        assert [r["class"] for r in load_dataset(tmp_path / "synth.npz")["train"]] == [1, 1, 1]  # the class asked for
        assert not np.array_equal(one["images"], samples["images"])  # the class changes the images
        guided, manifest = _infer(run, tmp_path / "guided", "--set", "sampling_args.guidance_scale=2")
        assert manifest["nfe_per_image"] == 6 and manifest["guidance_scale"] == 2.0
        assert not np.array_equal(guided["images"], samples["images"])
    else:
        assert "classes" not in samples.files
        with pytest.raises(SystemExit, match="this model is not class-conditional"):
            _infer(run, tmp_path / "refused", "--class", "4CH_ES")
    if mode == "mask+class":
        _class_file_gives_each_png_mask_its_class(run, tiny_data, tmp_path)


def _class_file_gives_each_png_mask_its_class(run, tiny_data, tmp_path):
    from PIL import Image

    folder = tmp_path / "masks"
    folder.mkdir()
    for i, r in enumerate(load_dataset(tiny_data)["test"][:2]):
        Image.fromarray(r["mask"][0]).save(folder / f"m{i}.png")
    with pytest.raises(SystemExit, match="masks have no class .* give --class NAME or --class_file FILE"):
        _infer(run, tmp_path / "none", "--masks", str(folder))
    (tmp_path / "classes.csv").write_text("mask,class\nm0.png,2CH_ES\nm1.png,4CH_ED\n")
    samples, _ = _infer(run, tmp_path / "file", "--masks", str(folder), "--class_file", str(tmp_path / "classes.csv"))
    assert samples["classes"].tolist() == [1, 2, 1, 2, 1]


@pytest.mark.slow
def test_a_checkpoint_from_before_the_modes_still_loads_and_makes_the_same_images(tiny_run, tiny_data, tmp_path):
    """The tiny mask-mode run with what the modes added to the checkpoint taken out again."""
    ckpt = torch.load(tiny_run / "last.ckpt", map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["config"]["conditioning_args"]["mode"] == "mask"
    del hp["config"]["conditioning_args"], hp["config"]["sampling_args"]["guidance_scale"], hp["class_names"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    old = load_module(tmp_path / "old.ckpt")
    assert old.cfg.conditioning_args.mode == "mask" and old.class_names == []
    assert sorted(old.state_dict()) == sorted(load_module(tiny_run / "last.ckpt").state_dict())
    new_samples, _ = _infer(tiny_run, tmp_path / "new")
    old_samples, _ = _infer(tmp_path / "old.ckpt", tmp_path / "old")
    assert np.array_equal(new_samples["images"], old_samples["images"])


@pytest.mark.slow
@pytest.mark.parametrize("mode_run", ["mask+class"], indirect=True)  # a class and a dropped mask: both measurements
def test_the_measurements_run_on_a_tiny_model(mode_run, tmp_path):
    from utils.studies import conditioning

    _, run = mode_run
    common = ["--checkpoint", str(run), "--which", "last", "--output_dir", str(tmp_path)]
    assert conditioning.main(["classes", *common, "--per_class", "2", "--classifier_steps", "20"]) == 0
    r = json.loads((tmp_path / "classes.json").read_text())
    for part in ("real_test", "generated"):
        matrix = np.array(r[part]["confusion"])
        assert matrix.sum() == r[part]["n"] and r[part]["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert np.array(r["generated"]["confusion"]).sum(1).tolist() == [2, 2, 2, 2]
    assert conditioning.main(["guidance", *common, "--scales", "1", "2", "--num_samples", "3"]) == 0
    rows = json.loads((tmp_path / "guidance.json").read_text())["rows"]
    assert [(x["guidance_scale"], x["nfe_per_image"]) for x in rows] == [(1.0, 3), (2.0, 6)]
    assert rows[0]["ssim"]["mean"] != rows[1]["ssim"]["mean"]
    assert "| 2 | 6 |" in (tmp_path / "guidance.md").read_text()
