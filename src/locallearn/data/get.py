"""``locallearn data get NAME --root DIR``: download, verify and safely extract a dataset's official archives.

For users with internet only: the library itself never downloads at run time, and the tests serve archives from
a local HTTP server (docs/data.md, "No downloads at run time"). For each archive of ``NAME`` (``SOURCES``):

- download ``URL`` to ``DIR/<folder>/<file>.part`` with urllib; a ``.part`` left by an interrupted run is resumed with
  an HTTP ``Range: bytes=<have>-`` request (a server that ignores it answers 200 and we start over);
- verify the size and the sha256, then rename ``.part`` to the file; a mismatch deletes the ``.part`` and raises
  :class:`DataError` before anything is extracted;
- extract ``.tar.gz`` archives after checking every member first: absolute paths, ``..`` components, links that
  point outside the folder (or are absolute), devices and FIFOs are refused and nothing is written. ``.gz`` IDX files
  (MNIST family) and SVHN ``.mat`` files are read as they are, so they are kept, not extracted.

Finally it prints the ``data.root`` to use. The folders (``DIR/cifar10``, ``DIR/fashion-mnist``...) are the
registry's default roots when ``DIR`` is ``data`` (docs/data.md, "File formats", for the layouts).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import posixpath
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .idx import DataError


@dataclass(frozen=True)
class Archive:
    """One file to fetch: its URL, size in bytes, sha256 (None: size only) and, for a tarball, the folder it makes."""

    url: str
    size: int
    sha256: str | None
    extracts_to: str | None = None  # a tar(.gz) is extracted and must create this folder; None: kept as downloaded

    @property
    def filename(self) -> str:
        return posixpath.basename(self.url.split("?", 1)[0])


@dataclass(frozen=True)
class Source:
    folder: str  # under --root; matches the registry's default root data/<folder>
    archives: tuple[Archive, ...]


# Sizes and sha256 as published in TensorFlow Datasets' url_checksums/{mnist,fashion_mnist,cifar10,cifar100,
# svhn_cropped,stl10}.txt (sizes cross-checked with the ones the original pages and torchvision document). Every entry
# below has a sha256, so every download is verified by size and hash. MNIST comes from the CVDF mirror that TFDS uses
# (the files are the original yann.lecun.com ones, which is often unreachable); CIFAR in its binary version, which
# the cifar reader prefers because it needs no unpickling.
_FMNIST = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_SVHN = "http://ufldl.stanford.edu/housenumbers/"
_SVHN_TRAIN = Archive(
    _SVHN + "train_32x32.mat", 182040794, "435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8"
)
_SVHN_TEST = Archive(
    _SVHN + "test_32x32.mat", 64275384, "cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b"
)
_SVHN_EXTRA = Archive(
    _SVHN + "extra_32x32.mat", 1329278602, "a133a4beb38a00fcdda90c9489e0c04f900b660ce8a316a5e854838379a71eb3"
)

SOURCES: dict[str, Source] = {
    "fashion_mnist": Source(
        "fashion-mnist",
        (
            Archive(
                _FMNIST + "train-images-idx3-ubyte.gz",
                26421880,
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            ),
            Archive(
                _FMNIST + "train-labels-idx1-ubyte.gz",
                29515,
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            ),
            Archive(
                _FMNIST + "t10k-images-idx3-ubyte.gz",
                4422102,
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            ),
            Archive(
                _FMNIST + "t10k-labels-idx1-ubyte.gz",
                5148,
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            ),
        ),
    ),
    "mnist": Source(
        "mnist",
        (
            Archive(
                _MNIST + "train-images-idx3-ubyte.gz",
                9912422,
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            ),
            Archive(
                _MNIST + "train-labels-idx1-ubyte.gz",
                28881,
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            ),
            Archive(
                _MNIST + "t10k-images-idx3-ubyte.gz",
                1648877,
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            ),
            Archive(
                _MNIST + "t10k-labels-idx1-ubyte.gz",
                4542,
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            ),
        ),
    ),
    "cifar10": Source(
        "cifar10",
        (
            Archive(
                "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                170052171,
                "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                "cifar-10-batches-bin",
            ),
        ),
    ),
    "cifar100": Source(
        "cifar100",
        (
            Archive(
                "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
                168513733,
                "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
                "cifar-100-binary",
            ),
        ),
    ),
    "svhn": Source("svhn", (_SVHN_TRAIN, _SVHN_TEST)),
    "svhn_extra": Source("svhn", (_SVHN_TRAIN, _SVHN_TEST, _SVHN_EXTRA)),
    "stl10": Source(
        "stl10",
        (
            Archive(
                "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
                2640397119,
                "f31fd99273a1acb8609c8db427cebb1de3f71de77758cdc0e22956e1289b9866",
                "stl10_binary",
            ),
        ),
    ),
}

CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, archive: Archive, what: str) -> None:
    """Size, then sha256 (when known); a mismatch removes ``path`` and raises a one-line :class:`DataError`."""
    size = path.stat().st_size
    if size != archive.size:
        path.unlink()
        raise DataError(
            f"{path}: {what} is {size} bytes, expected {archive.size} for {archive.url}; "
            "the download is truncated or the file changed upstream, deleted it: run the command again"
        )
    if archive.sha256 is not None:
        digest = sha256_of(path)
        if digest != archive.sha256:
            path.unlink()
            raise DataError(
                f"{path}: sha256 {digest} does not match the published {archive.sha256} for {archive.url}; "
                "the download is corrupt, deleted it: run the command again"
            )


def download(archive: Archive, dest: Path, *, timeout: float = 60.0, log: Callable[[str], None] = print) -> Path:
    """Fetch ``archive`` to ``dest`` via ``dest.part`` (resumed with a Range request), verified; returns ``dest``."""
    if dest.is_file():
        _verify(dest, archive, "the existing file")
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if have > archive.size:  # longer than the whole file: cannot be a prefix of it
        part.unlink()
        have = 0
    if have < archive.size:
        request = urllib.request.Request(archive.url, headers={"User-Agent": "locallearn"})
        if have:
            request.add_header("Range", f"bytes={have}-")
        log(f"downloading {archive.url} ({archive.size / 1e6:.1f} MB){f', resuming at {have} bytes' if have else ''}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                resumed = have and response.status == 206
                promised = response.headers.get("Content-Length")
                written = 0
                with part.open("ab" if resumed else "wb") as f:
                    while block := response.read(CHUNK):
                        f.write(block)
                        written += len(block)
                if promised is not None and written < int(promised):  # http.client returns short reads silently
                    raise http.client.IncompleteRead(b"", int(promised) - written)
        except urllib.error.HTTPError as e:
            if e.code == 416:  # the .part already covers everything the server has
                pass
            else:
                raise DataError(
                    f"{archive.url}: HTTP {e.code} {e.reason}; try again later or fetch it by hand"
                ) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", None) or type(e).__name__
            got = part.stat().st_size if part.is_file() else 0
            raise DataError(
                f"{archive.url}: download interrupted at {got} of {archive.size} bytes ({reason}); "
                f"run the command again to resume from {part}"
            ) from None
    _verify(part, archive, "the download")
    os.replace(part, dest)
    return dest


def _is_within(root: Path, target: Path) -> bool:
    return os.path.commonpath([root, target]) == str(root)


def check_members(tar: tarfile.TarFile, root: Path, source: Path) -> list[tarfile.TarInfo]:
    """Every member of ``tar``, after refusing (one-line :class:`DataError`) any that could write outside ``root``."""
    root = Path(os.path.realpath(root))
    members = tar.getmembers()
    for m in members:
        name = m.name
        parts = name.replace("\\", "/").split("/")
        problem = None
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
            problem = "an absolute path"
        elif ".." in parts:
            problem = "a '..' component"
        elif not _is_within(root, Path(os.path.realpath(root / name))):
            problem = "a path outside the folder"
        elif m.isdev():
            problem = "a device or FIFO"
        elif m.issym() or m.islnk():
            link = m.linkname
            if os.path.isabs(link) or link.startswith("\\"):
                problem = f"a link to the absolute path {link}"
            else:
                base = root / posixpath.dirname(name) if m.issym() else root  # hard links name archive paths
                if not _is_within(root, Path(os.path.realpath(base / link))):
                    problem = f"a link to {link}, outside the folder"
        elif not (m.isfile() or m.isdir()):
            problem = "an unsupported member type"
        if problem:
            raise DataError(f"{source}: member {name!r} has {problem}; refusing to extract this archive")
    return members


def extract(path: Path, root: Path) -> None:
    """Extract the tar(.gz) ``path`` into ``root`` after :func:`check_members` accepted every member."""
    try:
        with tarfile.open(path, "r:*") as tar:
            members = check_members(tar, root, path)
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # a second guard, Python >= 3.11.4
            tar.extractall(root, members=members, **kwargs)
    except DataError:
        raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(
            f"{path}: cannot extract ({type(e).__name__}: {e}); delete it and run the command again"
        ) from None


def get(
    name: str,
    root: str | os.PathLike,
    sources: Mapping[str, Source] | None = None,
    *,
    timeout: float = 60.0,
    log: Callable[[str], None] = print,
) -> Path:
    """Download, verify and extract dataset ``name`` under ``root/<folder>``; returns the folder for ``data.root``.

    ``sources`` replaces :data:`SOURCES` (the tests point it at a local server).
    """
    table = SOURCES if sources is None else sources
    if name not in table:
        raise ValueError(f"no download known for dataset {name!r}; known: {', '.join(sorted(table))}")
    source = table[name]
    folder = Path(os.path.expanduser(root)) / source.folder
    folder.mkdir(parents=True, exist_ok=True)
    for archive in source.archives:
        if archive.extracts_to and (folder / archive.extracts_to).is_dir():
            log(f"{folder / archive.extracts_to}: already there, skipping {archive.filename}")
            continue
        path = download(archive, folder / archive.filename, timeout=timeout, log=log)
        if archive.extracts_to:
            log(f"extracting {path}")
            extract(path, folder)
            if not (folder / archive.extracts_to).is_dir():
                raise DataError(
                    f"{path}: extracted, but it did not create {archive.extracts_to}/; not the expected archive"
                )
    log(f"{name} is ready: set data.root={folder}")
    return folder
