"""Every bad input a new user can give the three CLIs ends in one 'error:' line naming the file, and
writes nothing: no traceback, no output directory."""

import re
import shutil
import zipfile

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

import evaluate
import inferer
import trainer
from utils.config import dump_config
from utils.methods import load_config


class NotAWeight:
    """A pickled instance of this class is refused by torch.load(weights_only=True)."""


def _checkpoint(tiny_run):
    return torch.load(tiny_run / "last.ckpt", map_location="cpu", weights_only=True)


def _truncated(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def bad_checkpoint(kind, tiny_run, tmp):
    """A path given as --checkpoint, and the text the error must contain besides the path."""
    path = tmp / f"{kind}.ckpt"
    if kind == "missing":
        return path, "does not exist"
    if kind == "no_checkpoints":
        path = tmp / "empty_run"
        path.mkdir()
        return path, "has no best-epoch"
    if kind == "truncated":
        return _truncated(tiny_run / "last.ckpt", path), "cannot read as a PyTorch checkpoint"
    if kind == "text":  # torch.load once answered "Please file an issue ... weights_only"
        path.write_text("not a checkpoint")
        return path, r"cannot read as a PyTorch checkpoint \(truncated, corrupt or another kind of file"
    if kind == "other_zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "hello")
        return path, "cannot read as a PyTorch checkpoint"
    ckpt = _checkpoint(tiny_run)
    if kind == "not_comet":
        torch.save({"state_dict": ckpt["state_dict"]}, path)
        return path, "not a COMET checkpoint"
    if kind == "pickled_class":
        torch.save({**ckpt, "extra": NotAWeight()}, path)
        return path, r"refused by torch.load\(weights_only=True\)"
    if kind == "invalid_config":
        ckpt["hyper_parameters"]["config"]["model_args"]["norm_num_groups"] = 3
        torch.save(ckpt, path)
        return path, "model_args.channels each must be divisible by norm_num_groups"
    if kind == "missing_weights":
        ckpt["state_dict"].pop(next(iter(ckpt["state_dict"])))
        torch.save(ckpt, path)
        return path, "state_dict does not match its config: 1 missing"
    if kind == "unexpected_weights":
        ckpt["state_dict"]["model.extra"] = torch.zeros(1)
        torch.save(ckpt, path)
        return path, "state_dict does not match its config: 1 unexpected"
    raise AssertionError(kind)


CHECKPOINTS = ["missing", "no_checkpoints", "truncated", "text", "other_zip", "not_comet", "pickled_class",
               "invalid_config", "missing_weights", "unexpected_weights"]


def _expect_error(run, named, message, out):
    with pytest.raises(SystemExit) as e:
        run()
    text = str(e.value.code)
    assert text.startswith("error:") and "Traceback" not in text, text
    assert str(named) in text, text
    assert message is None or re.search(message, text), text
    assert not out.exists()


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    monkeypatch.delenv("COMET_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("COMET_CLIP_DIR", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("COMET_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_inferer_bad_checkpoint(tiny_run, tmp_path, kind):
    path, message = bad_checkpoint(kind, tiny_run, tmp_path)
    out = tmp_path / "out"
    _expect_error(lambda: inferer.main(["--checkpoint", str(path), "--output_dir", str(out)]), path, message, out)


@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_evaluate_bad_checkpoint(tiny_run, tmp_path, no_weights, kind):
    path, message = bad_checkpoint(kind, tiny_run, tmp_path)
    out = tmp_path / "out"
    _expect_error(lambda: evaluate.main(["--checkpoint", str(path), "--skip_missing_metrics", "--output_dir",
                                         str(out)]), path, message, out)


@pytest.mark.parametrize("kind", ["empty", "no_mask_files"])
def test_inferer_masks_folder_without_masks(tiny_run, tmp_path, kind):
    folder = tmp_path / "masks"
    folder.mkdir()
    if kind == "no_mask_files":
        (folder / "readme.txt").write_text("masks go here")
    out = tmp_path / "out"
    _expect_error(lambda: inferer.main(["--checkpoint", str(tiny_run), "--masks", str(folder), "--output_dir",
                                        str(out)]), folder, "holds no .png/.npy label maps", out)


def test_inferer_split_that_does_not_exist(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "out"
    _expect_error(lambda: inferer.main(["--checkpoint", str(tiny_run), "--split", "nope", "--output_dir", str(out)]),
                  tiny_data, "split 'nope' is missing", out)


def test_evaluate_split_that_does_not_exist(tiny_run, tiny_data, tmp_path, no_weights):
    out = tmp_path / "out"
    _expect_error(lambda: evaluate.main(["--checkpoint", str(tiny_run), "--split", "nope", "--skip_missing_metrics",
                                         "--output_dir", str(out)]), tiny_data, "no 'nope' split", out)


@pytest.fixture(scope="module")
def samples(tiny_run, tmp_path_factory):
    """An inferer.py samples.npz (with its manifest) of the tiny run."""
    out = tmp_path_factory.mktemp("samples") / "gen"
    assert inferer.main(["--checkpoint", str(tiny_run), "--num_samples", "3", "--num_steps", "1",
                         "--output_dir", str(out)]) == 0
    return out / "samples.npz"


def _edited(samples, tmp, **arrays):
    z = {**dict(np.load(samples)), **arrays}
    path = tmp / "samples.npz"
    np.savez(path, **z)
    shutil.copy(samples.with_name("manifest.json"), tmp / "manifest.json")
    return path


def bad_samples(kind, samples, tmp):
    images = np.load(samples)["images"]
    if kind == "truncated":
        return _truncated(samples, tmp / "samples.npz"), "cannot read as an .npz archive"
    if kind == "not_npz":
        (tmp / "samples.npz").write_text("images, masks, indices")
        return tmp / "samples.npz", "cannot read as an .npz archive: no complete zip archive"
    if kind == "missing":
        return tmp / "samples.npz", "no such file"
    if kind == "nan":
        bad = images.copy()
        bad[0, 0, 0, 0] = np.nan
        return _edited(samples, tmp, images=bad), "NaN"
    if kind == "outside_unit":
        return _edited(samples, tmp, images=images * 2 - 0.5), r"expected \[0, 1\]"
    if kind == "wrong_shape":
        return _edited(samples, tmp, images=images[:, 0]), r"expected \[N, 1, H, W\]"
    if kind == "float_masks":
        return _edited(samples, tmp, masks=np.load(samples)["masks"].astype(np.float32)), "expected integer"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "not_npz", "missing", "nan", "outside_unit", "wrong_shape",
                                  "float_masks"])
def test_evaluate_bad_samples(samples, tmp_path, no_weights, kind):
    path, message = bad_samples(kind, samples, tmp_path)
    out = tmp_path / "out"
    _expect_error(lambda: evaluate.main(["--samples", str(path), "--skip_missing_metrics", "--output_dir", str(out)]),
                  path, message, out)


def test_evaluate_unreadable_inception_weights(samples, tmp_path, no_weights):
    """A junk --inception_weights file once ended in a KeyError traceback from torch.load."""
    weights, out = tmp_path / "junk.pth", tmp_path / "out"
    weights.write_text("not a state dict")
    _expect_error(lambda: evaluate.main(["--samples", str(samples), "--skip_missing_metrics", "--inception_weights",
                                         str(weights), "--output_dir", str(out)]),
                  weights, "cannot read as inception-v3-compat weights", out)


def test_evaluate_data_path_that_does_not_exist(samples, tmp_path, no_weights):
    out, missing = tmp_path / "out", tmp_path / "none.npz"
    _expect_error(lambda: evaluate.main(["--samples", str(samples), "--data_path", str(missing),
                                         "--skip_missing_metrics", "--output_dir", str(out)]),
                  missing, "no such dataset", out)


def _train_args(tmp, data):
    return ["--config_path", "configs/tiny.yaml"] + [
        a for s in tiny_overrides(tmp, **{"data_args.path": data, "data_args.synthetic": "null"}) for a in ("--set", s)]


def _train(tmp, data):
    return lambda: trainer.main(_train_args(tmp, data))


@pytest.mark.parametrize("kind", ["missing", "truncated", "not_a_dataset"])
def test_trainer_bad_dataset(tiny_data, tmp_path, kind):
    data = tmp_path / "data.npz"
    if kind == "truncated":
        _truncated(tiny_data, data)
    elif kind == "not_a_dataset":
        data.write_text("not a dataset")
    _expect_error(_train(tmp_path, data), data, None, tmp_path / "runs")


def test_a_text_file_named_npz_is_not_offered_an_unsafe_load(tmp_path):
    """numpy reads a non-zip .npz as a pickle and suggests allow_pickle=True; the error says what the file is."""
    from utils.data.dataset_io import load_dataset
    from utils.data.layout import DatasetError

    data = tmp_path / "data.npz"
    data.write_text("hello world, not numpy\n")
    with pytest.raises(DatasetError, match="data.npz: not a readable .npz file: no complete zip archive") as e:
        load_dataset(data)
    assert "pickle" not in str(e.value)


@pytest.mark.parametrize("kind", ["last_ckpt", "config_yaml"])
def test_trainer_bad_file_in_the_run_to_resume(tiny_run, tiny_data, tmp_path, kind):
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    dump_config(load_config("configs/tiny.yaml", _train_args(tmp_path, tiny_data)[3::2]), run / "config.yaml")
    _truncated(tiny_run / "last.ckpt", run / "last.ckpt")
    bad = run / ("last.ckpt" if kind == "last_ckpt" else "config.yaml")
    if kind == "config_yaml":
        bad.write_text("data_args: [unclosed\n")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, tiny_data)()
    assert str(e.value.code).startswith("error:") and str(bad) in str(e.value.code)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize("kind, message", [("binary", "not a text YAML file"), ("directory", "a directory, not")])
def test_a_config_that_is_not_a_yaml_file_is_named(tmp_path, kind, message):
    """A binary file given as --config_path once ended in a UnicodeDecodeError traceback."""
    path = tmp_path / "config.yaml"
    if kind == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    else:
        path.mkdir()
    with pytest.raises(SystemExit, match=rf"error: {re.escape(str(path))}: {message}"):
        trainer.main(["--config_path", str(path)])


def test_a_class_file_that_is_not_text_is_named(tmp_path):
    """A spreadsheet saved as binary once ended in a UnicodeDecodeError traceback."""
    from utils.data.masks import MaskError
    from utils.generation.classes import read_class_file

    path = tmp_path / "classes.xlsx"
    path.write_bytes(b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00\xb5U0#\xf4\x00\x00\x00L\x02\x00\x00")
    with pytest.raises(MaskError, match=rf"{re.escape(str(path))}: not a text CSV of mask,class rows"):
        read_class_file(path, ["a", "b"])


@pytest.mark.parametrize("source", ["npy", "dataset"])
def test_a_reference_image_of_nan_is_refused(tmp_path, source):
    """Reference-guided generation from a NaN image once wrote all-NaN images and exited 0."""
    from utils.data.masks import MaskError
    from utils.generation.references import load_references

    image = np.full((32, 32), 0.5, dtype=np.float32)
    image[3, 4] = np.nan
    if source == "npy":
        path = tmp_path / "reference.npy"
        np.save(path, image)
        named = path
    else:
        from utils.data.dataset_io import save_dataset

        path = save_dataset(tmp_path / "data.pkl", {"test": [{"image": image, "mask": np.zeros((32, 32), np.uint8)}]})
        named = f"{path}: test[0]"
    with pytest.raises(MaskError, match=rf"{re.escape(str(named))}: 1 pixel\(s\) of the reference image are NaN"):
        load_references(path, "test", 32)


def test_2d_masks_given_to_a_3d_model_are_refused(tiny_data):
    """A .npz of 2-D label maps as --masks of a 3-D checkpoint once became one-slice volumes resampled into the
    cube (every output had its mask on one slice) and exited 0."""
    from utils.data.masks import MaskError, load_masks

    with pytest.raises(MaskError, match=r"test\[0\]: a mask of shape \[1, 32, 32\] is a 2-D label map"):
        load_masks(tiny_data, "test", 4, 32, spatial_dims=3)
    assert len(load_masks(tiny_data, "test", 4, 32).masks) > 0  # the same file for a 2-D model


def test_a_folder_of_png_masks_loads_without_a_warning(tmp_path):
    """PIL's arrays are read-only, and torch warned (once per process, so checked in a fresh one) on every --masks
    run that it cannot protect them."""
    import subprocess
    import sys

    from PIL import Image

    Image.fromarray(np.array([[0, 1], [2, 3]], dtype=np.uint8)).save(tmp_path / "a.png")
    code = (f"from utils.data.masks import load_masks; s = load_masks({str(tmp_path)!r}, 'test', 4, 2); "
            "print(s.masks.shape)")
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch.Size([1, 1, 2, 2])"
