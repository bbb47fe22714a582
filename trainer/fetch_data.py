"""`make data`: put Fashion-MNIST where trainer/data.py looks for it.

In order, stopping at the first that works:
  1. the files are already there (Debian's package, or the download cache): do nothing;
  2. `apt-get install dataset-fashion-mnist`, when running as root or with passwordless sudo;
  3. torchvision's download into the cache, through the trainer's own `load_dataset`;
  4. Debian's package fetched with `apt-get download` and unpacked into the cache (no root needed).
When none works it prints one message (what it tried, how to fix it) and exits 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from trainer.data import DEBIAN_FASHION_MNIST, DEFAULT_ROOT, load_dataset
from trainer.images import DatasetMissing

NAME = "fashion-mnist"
PACKAGE = "dataset-fashion-mnist"
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def found(folder: Path) -> bool:
    """Both splits load from `folder` with the reader the trainer uses, so "found" means "usable"."""
    try:
        for train in (True, False):
            load_dataset(NAME, str(folder), train=train, download=False)
    except DatasetMissing:
        return False
    except (OSError, EOFError, ValueError) as error:  # a truncated download, say: stop, never fetch over it
        fix = (
            "reinstall them: apt-get install --reinstall dataset-fashion-mnist"
            if folder == DEBIAN_FASHION_MNIST
            else "delete them and run `make data` again"
        )
        raise SystemExit(f"make data: the Fashion-MNIST files in {folder} are unreadable ({error}); {fix}") from error
    return True


def _run(command: list[str], **kwargs) -> int:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, **kwargs).returncode


def as_root() -> list[str] | None:
    """The prefix that runs a command as root: [] for root, sudo when it needs no password, else None."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


def apt_install() -> str | None:
    """None when apt-get succeeded, else why it could not."""
    if not shutil.which("apt-get"):
        return "apt-get not found (not a Debian/Ubuntu machine)"
    prefix = as_root()
    if prefix is None:
        return "needs root or passwordless sudo (`sudo -n true` failed)"
    # env, not os.environ: sudo drops the caller's environment.
    apt = [*prefix, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-qq"]
    for step in (["update"], ["install", "-y", PACKAGE]):
        code = _run(apt + step)
        if code:
            return f"`apt-get {' '.join(step)}` exited {code}"
    return None


def torchvision_download(cache: Path) -> str | None:
    # root=cache: the same download code the trainer runs with data.download=true, aimed at the cache.
    try:
        load_dataset(NAME, str(cache), train=True, download=True)
    except DatasetMissing as error:
        return " ".join(str(error.__cause__ or error).split())
    return None


def unpack_deb(cache: Path) -> str | None:
    """Debian's package, unpacked into the cache by hand: works without root where apt's lists exist."""
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return "apt-get or dpkg-deb not found (not a Debian/Ubuntu machine)"
    with tempfile.TemporaryDirectory() as tmp:
        code = _run(["apt-get", "-qq", "download", PACKAGE], cwd=tmp)
        if code:
            return f"`apt-get download {PACKAGE}` exited {code}"
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            return f"`apt-get download {PACKAGE}` left {len(debs)} .deb files, expected 1"
        code = _run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "root")])
        if code:
            return f"`dpkg-deb -x` exited {code}"
        unpacked = Path(tmp) / "root" / DEBIAN_FASHION_MNIST.relative_to("/")
        missing = [f for f in FILES if not (unpacked / f).exists()]
        if missing:
            return f"the package has no {', '.join(missing)} in {DEBIAN_FASHION_MNIST}"
        cache.mkdir(parents=True, exist_ok=True)
        for f in FILES:
            shutil.copyfile(unpacked / f, cache / f)
    return None


def fetch(debian: Path, cache: Path, apt: bool = True) -> int:
    for folder in (debian, cache):
        if found(folder):
            print(f"Fashion-MNIST: found in {folder}")
            return 0
    print(f"Fashion-MNIST: not in {debian} nor {cache}; getting it", flush=True)
    attempts = [
        (
            f"apt-get install {PACKAGE}",
            debian,
            apt_install if apt else lambda: f"skipped: it would install into {DEBIAN_FASHION_MNIST}, not {debian}",
        ),
        (f"torchvision download into {cache}", cache, lambda: torchvision_download(cache)),
        (f"apt-get download {PACKAGE} + dpkg-deb -x into {cache}", cache, lambda: unpack_deb(cache)),
    ]
    tried = []
    for what, folder, attempt in attempts:
        print(f"Fashion-MNIST: trying {what}", flush=True)
        why = attempt()
        if why is None and found(folder):
            print(f"Fashion-MNIST: {what} worked; files in {folder}")
            return 0
        why = why or f"finished, but the files are not in {folder}"
        print(f"Fashion-MNIST: {what} did not work: {why}", flush=True)
        tried.append(f"  - {what}: {why}")
    print(
        "\n".join(
            [
                f"make data: Fashion-MNIST is missing and could not be fetched. Looked in {debian} and {cache}. Tried:",
                *tried,
                "Fix one of these, then run `make data` again:",
                f"  - as root: apt-get update && apt-get install {PACKAGE}   (Debian/Ubuntu)",
                "  - give this machine internet access (torchvision downloads the files)",
                f"  - copy {', '.join(FILES)} into {cache}",
                "    (or set INSTDISC_DATA to a folder whose fashion-mnist/ sub-folder holds them)",
            ]
        ),
        file=sys.stderr,
    )
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.fetch_data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Overridable so the fetch branches can be rehearsed on a machine that has Debian's package.
    parser.add_argument(
        "--debian-dir",
        type=Path,
        default=DEBIAN_FASHION_MNIST,
        help="where Debian's package puts the files (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    # A rehearsal (--debian-dir elsewhere) must not install the package system-wide.
    return fetch(args.debian_dir, DEFAULT_ROOT / NAME, apt=args.debian_dir == DEBIAN_FASHION_MNIST)


if __name__ == "__main__":
    sys.exit(main())
