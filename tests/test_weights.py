"""The weights command: a download is kept only when its SHA-256 starts with the digits its name carries, as
torch.hub checks; files are served from tmp_path through file:// URLs (no network)."""

from __future__ import annotations

import hashlib

import pytest

from utils.evaluation import weights


def named_for_itself(folder, stem: str) -> str:
    """A file named as torch.hub names its files, ``{stem}-{the first 8 hex digits of its SHA-256}.pth``."""
    data = b"tiny weights"
    name = f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    (folder / name).write_bytes(data)
    return name


@pytest.fixture
def served(tmp_path, monkeypatch):
    """FILES replaced by a good file ('good') and one whose bytes do not match its name ('bad'), at file:// URLs."""
    server = tmp_path / "server"
    server.mkdir()
    good = named_for_itself(server, "good")
    bad = "bad-0000abcd.pth"
    (server / bad).write_bytes(b"not the file the name promises")
    files = {key: weights.WeightsFile(name, (server / name).as_uri(), "tests", f"--{key}_weights FILE")
             for key, name in (("good", good), ("bad", bad))}
    monkeypatch.setattr(weights, "FILES", files)
    return files


def test_the_prefix_is_the_one_torch_hub_reads_from_each_real_file_name():
    assert {k: weights.hash_prefix(f.file) for k, f in weights.FILES.items()} == {
        "inception": "6726825d", "r3d": "b3b3357e", "vgg19": "dcbb9e9d"}
    with pytest.raises(ValueError, match="carries no SHA-256 prefix"):
        weights.hash_prefix("clip.pth")


def test_a_file_whose_digest_matches_its_name_is_fetched_and_verified(served, tmp_path, capsys):
    assert weights.main(["fetch", "--dir", str(tmp_path / "w"), "good"]) == 0
    path = tmp_path / "w" / served["good"].file
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    out = capsys.readouterr().out
    assert f"{path}: verified, sha256 {digest}" in out and f"--good_weights {path}" in out
    assert "hf download openai/clip-vit-large-patch14-336" in out
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [served["good"].file]  # no temporary file left


def test_a_corrupt_download_is_refused_and_leaves_nothing(served, tmp_path, capsys):
    assert weights.main(["fetch", "--dir", str(tmp_path / "w"), "bad"]) == 1
    err = capsys.readouterr().err
    got = hashlib.sha256(b"not the file the name promises").hexdigest()
    assert f"bad-0000abcd.pth: SHA-256 {got} does not start with 0000abcd" in err
    assert list((tmp_path / "w").iterdir()) == []


def test_a_verified_file_already_there_is_not_downloaded_again(served, tmp_path, monkeypatch):
    assert weights.main(["fetch", "--dir", str(tmp_path), "good"]) == 0
    monkeypatch.setattr(weights, "download", lambda *a: pytest.fail("downloaded again"))
    assert weights.main(["fetch", "--dir", str(tmp_path), "good"]) == 0


def test_list_says_which_files_are_there_and_verified(served, tmp_path, capsys):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "bad-0000abcd.pth").write_bytes(b"junk")
    assert weights.main(["list", "--dir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert f"in --dir: {tmp_path / 'w' / served['good'].file}: missing" in out and served["good"].url in out
    assert "bad-0000abcd.pth: FAILS its check" in out
    weights.main(["fetch", "--dir", str(tmp_path / "w"), "good"])
    capsys.readouterr()
    weights.main(["list", "--dir", str(tmp_path / "w")])
    assert f"{served['good'].file}: verified (sha256 " in capsys.readouterr().out


def test_list_shows_where_the_evaluation_looks(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(weights.R3D_ENV, str(tmp_path / "r3d.pth"))
    weights.main(["list", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    hub = tmp_path / "torch_home" / "hub" / "checkpoints" / weights.INCEPTION_FILE_NAME
    assert f"looked for now (torch hub cache): {hub}: missing" in out
    assert f"looked for now (${weights.R3D_ENV}): {tmp_path / 'r3d.pth'}: missing" in out
    assert weights.INCEPTION_URL in out and "--inception_weights FILE" in out


def test_an_unknown_name_is_refused(capsys):
    with pytest.raises(SystemExit):
        weights.main(["fetch", "inceptoin"])
    assert "unknown weights ['inceptoin']" in capsys.readouterr().err


def test_the_inception_file_is_recorded_not_refused_by_digits_no_loader_checks(tmp_path, monkeypatch, capsys):
    """torch-fidelity loads its Inception file without check_hash: the 6726825d in its name may not be the start
    of its SHA-256, so a file of that name is kept, its digest printed and its status says it was not checked."""
    server = tmp_path / "server"
    server.mkdir()
    (server / weights.INCEPTION_FILE_NAME).write_bytes(b"any bytes")
    entry = weights.FILES["inception"]
    monkeypatch.setattr(weights, "FILES", {"inception": weights.WeightsFile(
        entry.file, (server / entry.file).as_uri(), entry.used_for, entry.point_to)})
    assert weights.main(["fetch", "--dir", str(tmp_path / "w"), "inception"]) == 0
    digest = hashlib.sha256(b"any bytes").hexdigest()
    assert f"present (its name's digits are no published checksum: not checked), sha256 {digest}" in \
        capsys.readouterr().out
    assert weights.status(tmp_path / "w" / entry.file, entry.file).startswith("present (")
