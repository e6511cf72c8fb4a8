"""The optional weights files: where each comes from, where COMET looks for it, and a command that fetches and
checks them on a machine with internet (nothing else in COMET downloads anything).

Examples:
    python -m utils.evaluation.weights list
    python -m utils.evaluation.weights fetch --dir weights/
    python -m utils.evaluation.weights fetch --dir weights/ inception r3d

A file is checked as torch.hub checks what it downloads (``torch.hub.download_url_to_file``): the hex digits
between the name's '-' and its extension (``r3d_18-b3b3357e.pth``) are the first digits of the file's SHA-256.
``fetch`` downloads into a temporary file beside the target, deletes it when its digest does not start with
those digits, and only then moves it into place, so a file under its final name has passed. A file already
there that passes is not downloaded again. CMMD's CLIP is a Hugging Face directory, not one file: both
commands print the ``hf download`` command for it. No torch at import (``--help`` is instant): ``list`` loads
it only to ask torch.hub where its cache is. The file names and URLs are defined here and nowhere else.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

INCEPTION_ENV = "COMET_INCEPTION_WEIGHTS"
INCEPTION_FILE_NAME = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's, not pytorch-fid's
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE_NAME}"
R3D_ENV = "COMET_R3D_WEIGHTS"
R3D_FILE_NAME = "r3d_18-b3b3357e.pth"
R3D_URL = f"https://download.pytorch.org/models/{R3D_FILE_NAME}"
VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = f"https://download.pytorch.org/models/{VGG19_FILE}"
CLIP_ENV = "COMET_CLIP_DIR"
CLIP_MODEL_ID = "openai/clip-vit-large-patch14-336"
CLIP_DIR_NAME = CLIP_MODEL_ID.split("/")[1]

HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")  # torch.hub's own (importing it would import torch)
# Names whose digits no loader checks (torch-fidelity loads its Inception file without check_hash), so nothing says
# they are the start of the file's SHA-256: recorded and printed, not used to refuse the file.
UNCHECKED_NAMES = {INCEPTION_FILE_NAME}


@dataclass(frozen=True)
class WeightsFile:
    file: str
    url: str
    used_for: str
    point_to: str  # how the run is told where the file is; FILE stands for its path
    env: str | None = None  # the evaluation's environment variable, when it has one
    hub_cache: bool = False  # also looked for in torch hub's checkpoints/ folder


FILES = {
    "inception": WeightsFile(INCEPTION_FILE_NAME, INCEPTION_URL, "FID, KID and 2.5D-FID (evaluate.py)",
                             f"evaluate.py --inception_weights FILE, or {INCEPTION_ENV}=FILE", INCEPTION_ENV, True),
    "r3d": WeightsFile(R3D_FILE_NAME, R3D_URL, "3D-FID of volumes (evaluate.py)",
                       f"evaluate.py --r3d_weights FILE, or {R3D_ENV}=FILE", R3D_ENV, True),
    "vgg19": WeightsFile(VGG19_FILE, VGG19_URL, "SPADE's perceptual loss (training, optional)",
                         "--set spade_args.perceptual_weights=FILE (with spade_args.perceptual_weight > 0)"),
}


class WeightsCheckError(ValueError):
    """A weights file whose SHA-256 does not start with the digits its name carries."""


def hash_prefix(file_name: str) -> str:
    """The SHA-256 prefix a torch.hub file name carries: ``r3d_18-b3b3357e.pth`` -> ``b3b3357e``."""
    match = HASH_REGEX.search(file_name)
    if not match or not match.group(1):
        raise ValueError(f"{file_name} carries no SHA-256 prefix ('-<hex digits>.' as torch.hub names its files)")
    return match.group(1)


def check(path: Path, file_name: str) -> str:
    """The full SHA-256 of ``path``, checked against the prefix ``file_name`` carries; raises
    :class:`WeightsCheckError` naming the file, the expected prefix and the digest it got."""
    from utils.files import sha256_file

    digest, prefix = sha256_file(path), hash_prefix(file_name)
    if file_name not in UNCHECKED_NAMES and not digest.startswith(prefix):
        raise WeightsCheckError(f"{file_name}: SHA-256 {digest} does not start with {prefix}, the prefix its name "
                                "carries: a corrupt, truncated or different file")
    return digest


def download(url: str, path: Path) -> None:
    """``url`` into ``path``, with a progress bar when the size is known."""
    import urllib.request

    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as f:  # a stalled server fails
        size = response.headers.get("Content-Length")
        with tqdm(total=int(size) if size else None, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                  file=sys.stderr) as bar:
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))


def fetch(name: str, directory: Path) -> tuple[Path, str]:
    """``(path, sha256)`` of ``FILES[name]`` in ``directory``: kept when already there and verified, else
    downloaded beside it, verified, and only then moved into place (a refused download leaves nothing)."""
    from utils.files import atomic_path

    entry = FILES[name]
    target = directory / entry.file
    if target.is_file():
        try:
            return target, check(target, entry.file)
        except WeightsCheckError as e:
            print(f"{target} is there but fails its check ({e}); downloading it again", file=sys.stderr)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, suffix=".part") as tmp:
        download(entry.url, tmp)
        digest = check(tmp, entry.file)
    return target, digest


def evaluation_paths(entry: WeightsFile) -> list[tuple[str, Path]]:
    """``[(source, path)]`` where a run finds ``entry`` without a flag: its environment variable when set, else
    torch hub's cache (imports torch for ``torch.hub.get_dir()``, which ``TORCH_HOME`` moves)."""
    if entry.env and os.environ.get(entry.env):
        return [(f"${entry.env}", Path(os.environ[entry.env]))]
    if entry.hub_cache:
        import torch

        return [("torch hub cache", Path(torch.hub.get_dir()) / "checkpoints" / entry.file)]
    return []


def verdict(file_name: str) -> str:
    """What :func:`check` established about a file of this name."""
    return "present (its name's digits are no published checksum: not checked)" if file_name in UNCHECKED_NAMES \
        else "verified"


def status(path: Path, file_name: str) -> str:
    """'missing', 'verified (sha256 ...)' or why the file fails its check."""
    if not path.is_file():
        return "missing"
    try:
        return f"{verdict(file_name)} (sha256 {check(path, file_name)})"
    except WeightsCheckError as e:
        return f"FAILS its check: {e}"


def clip_note(directory: Path) -> str:
    """How to get CMMD's CLIP directory, which this command does not fetch."""
    return (f"clip: CMMD's {CLIP_MODEL_ID} is a Hugging Face directory, not fetched here. On a machine with internet: "
            f"hf download {CLIP_MODEL_ID} --local-dir {directory / CLIP_DIR_NAME}\n"
            f"  then: evaluate.py --clip_dir DIR, or {CLIP_ENV}=DIR")


def list_files(directory: Path) -> str:
    """Each file: its URL, its state in ``directory`` and where the evaluation looks for it, then CLIP's note."""
    lines = []
    for name, entry in FILES.items():
        lines += [f"{name}: {entry.file}, for {entry.used_for}", f"  url: {entry.url}",
                  f"  in --dir: {directory / entry.file}: {status(directory / entry.file, entry.file)}",
                  f"  point the run at it: {entry.point_to}"]
        lines += [f"  looked for now ({source}): {path}: {status(path, entry.file)}"
                  for source, path in evaluation_paths(entry)]
    clip = directory / CLIP_DIR_NAME
    return "\n".join([*lines, clip_note(directory), f"  in --dir: {clip}: {'present' if clip.is_dir() else 'missing'}"])


def build_parser() -> argparse.ArgumentParser:
    description, _, epilog = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(prog="python -m utils.evaluation.weights", description=description,
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="each file, its URL, where it is looked for, present and verified?")
    getting = commands.add_parser("fetch", help="download and verify the files (all of them without names)")
    for sub in (listing, getting):
        sub.add_argument("--dir", type=Path, default=Path("weights"), help="the weights folder (default: weights)")
    getting.add_argument("names", nargs="*", metavar="NAME", help=f"which files: {', '.join(FILES)} (default: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(FILES)) if args.command == "fetch" else []
    if unknown:  # choices= with nargs="*" refuses the empty default on Python < 3.12
        parser.error(f"unknown weights {unknown}; choose from {', '.join(FILES)}")
    if args.command == "list":
        print(list_files(args.dir))
        return 0
    failed = []
    for name in args.names or FILES:
        try:
            path, digest = fetch(name, args.dir)
        except (WeightsCheckError, OSError) as e:  # a refused file, or no connection (URLError is an OSError)
            print(f"error: {name}: {e}", file=sys.stderr)
            failed.append(name)
            continue
        print(f"{path}: {verdict(path.name)}, sha256 {digest}\n  point the run at it: "
              + FILES[name].point_to.replace("FILE", str(path)))
    print(clip_note(args.dir))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
