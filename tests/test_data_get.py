"""locallearn.data.get (`locallearn data get`): download, resume, verify and safe extraction, against a local HTTP
server on 127.0.0.1 serving archives built here. Nothing is ever fetched from the internet."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from locallearn.cli.main import main
from locallearn.data import DataError
from locallearn.data import get as get_mod
from locallearn.data.get import SOURCES, Archive, Source, get

from .conftest import one_line_data_error as one_line_error

# ---------------------------------------------------------------------------------------------------------------------
# a local server: serves `files`, honours `Range: bytes=N-` unless told not to, and records every request


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m and not srv.ignore_range:
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            body = body[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:  # promise len(body) bytes, send fewer and hang up (a dropped connection)
            body, srv.cut_after = body[: srv.cut_after], None
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.ignore_range, httpd.cut_after = {}, [], False, None
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def serve(httpd, name: str, body: bytes, *, size: int | None = None, sha: str | None = "auto", folder=None) -> Archive:
    """Publish ``body`` at /name and return its table entry (size and sha256 of ``body`` unless overridden)."""
    httpd.files[f"/{name}"] = body
    digest = hashlib.sha256(body).hexdigest() if sha == "auto" else sha
    return Archive(f"{httpd.base}/{name}", len(body) if size is None else size, digest, folder)


def tarball(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, data: bytes | None = b"", kind=tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info, (data if kind == tarfile.REGTYPE else None)


def good_tar() -> bytes:
    return tarball(
        [
            member("toy-batches", kind=tarfile.DIRTYPE),
            member("toy-batches/a.bin", bytes(range(256)) * 40),
            member("toy-batches/sub/b.txt", b"hello"),
            member("toy-batches/alias.bin", kind=tarfile.SYMTYPE, link="a.bin"),  # a link inside: allowed
        ]
    )


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# ---------------------------------------------------------------------------------------------------------------------
# downloads


def test_good_download_extract_and_rerun(server, tmp_path):
    tar = serve(server, "toy.tar.gz", good_tar(), folder="toy-batches")
    plain = serve(server, "t10k-labels-idx1-ubyte.gz", b"\x1f\x8b not really gzip", sha=None)  # size-only entry
    sources = {"toy": Source("toy", (tar, plain))}
    logs: list[str] = []
    folder = get("toy", tmp_path, sources, log=logs.append)
    assert folder == tmp_path / "toy"
    assert (folder / "toy-batches" / "a.bin").read_bytes() == bytes(range(256)) * 40
    assert (folder / "toy-batches" / "sub" / "b.txt").read_bytes() == b"hello"
    assert (folder / "toy-batches" / "alias.bin").read_bytes() == bytes(range(256)) * 40
    assert (folder / "t10k-labels-idx1-ubyte.gz").read_bytes() == b"\x1f\x8b not really gzip"  # kept, not extracted
    assert not list(folder.glob("*.part"))
    assert f"data.root={folder}" in logs[-1]
    assert [r for _, r in server.requests] == [None, None]  # fresh downloads: no Range header
    # A second run downloads nothing: the extracted folder and the verified plain file are already there.
    server.requests.clear()
    assert get("toy", tmp_path, sources, log=logs.append) == folder
    assert server.requests == []


def test_corrupt_download_refused(server, tmp_path):
    body = bytearray(good_tar())
    good_sha = hashlib.sha256(body).hexdigest()
    body[len(body) // 2] ^= 0xFF  # same size, different bytes
    sources = {"toy": Source("toy", (serve(server, "toy.tar.gz", bytes(body), sha=good_sha, folder="toy-batches"),))}
    with pytest.raises(DataError) as exc:
        get("toy", tmp_path, sources, log=lambda s: None)
    one_line_error(exc, str(tmp_path / "toy" / "toy.tar.gz.part"), "sha256", good_sha, "corrupt")
    assert files_under(tmp_path / "toy") == set()  # nothing extracted, the bad .part removed


def test_truncated_download_refused(server, tmp_path):
    body = good_tar()
    archive = serve(server, "toy.tar.gz", body[:-100], size=len(body), folder="toy-batches")
    with pytest.raises(DataError) as exc:
        get("toy", tmp_path, {"toy": Source("toy", (archive,))}, log=lambda s: None)
    one_line_error(exc, str(tmp_path / "toy"), f"{len(body) - 100} bytes, expected {len(body)}", "truncated")
    assert files_under(tmp_path / "toy") == set()


@pytest.mark.parametrize("ignore_range", [False, True], ids=["range", "server-ignores-range"])
def test_resume_partial_download(server, tmp_path, ignore_range):
    body = good_tar()
    server.ignore_range = ignore_range
    sources = {"toy": Source("toy", (serve(server, "toy.tar.gz", body, folder="toy-batches"),))}
    (tmp_path / "toy").mkdir()
    half = len(body) // 2
    (tmp_path / "toy" / "toy.tar.gz.part").write_bytes(body[:half])
    get("toy", tmp_path, sources, log=lambda s: None)
    assert server.requests == [("/toy.tar.gz", f"bytes={half}-")]
    assert (tmp_path / "toy" / "toy.tar.gz").read_bytes() == body  # appended (206) or rewritten (200): verified
    assert (tmp_path / "toy" / "toy-batches" / "sub" / "b.txt").read_bytes() == b"hello"
    assert not (tmp_path / "toy" / "toy.tar.gz.part").exists()


def test_interrupted_then_resumed(server, tmp_path):
    body = good_tar()
    sources = {"toy": Source("toy", (serve(server, "toy.tar.gz", body, folder="toy-batches"),))}
    cut = server.cut_after = len(body) // 2
    part = tmp_path / "toy" / "toy.tar.gz.part"
    with pytest.raises(DataError) as exc:
        get("toy", tmp_path, sources, log=lambda s: None)
    one_line_error(exc, f"interrupted at {cut} of {len(body)}", "run the command again to resume", str(part))
    assert part.read_bytes() == body[:cut]  # kept for the next run
    get("toy", tmp_path, sources, log=lambda s: None)
    assert server.requests == [("/toy.tar.gz", None), ("/toy.tar.gz", f"bytes={cut}-")]
    assert (tmp_path / "toy" / "toy.tar.gz").read_bytes() == body and not part.exists()


def test_complete_part_is_verified(server, tmp_path):
    body = good_tar()
    sources = {"toy": Source("toy", (serve(server, "toy.tar.gz", body, folder="toy-batches"),))}
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "toy.tar.gz.part").write_bytes(body)  # interrupted after the last byte, before the rename
    get("toy", tmp_path, sources, log=lambda s: None)
    assert server.requests == []
    assert (tmp_path / "toy" / "toy-batches" / "a.bin").is_file()


def test_http_error_and_unknown_name(server, tmp_path):
    archive = Archive(f"{server.base}/missing.tar.gz", 10, None, "x")
    with pytest.raises(DataError) as exc:
        get("toy", tmp_path, {"toy": Source("toy", (archive,))}, log=lambda s: None)
    one_line_error(exc, "missing.tar.gz", "HTTP 404")
    with pytest.raises(ValueError, match="no download known for dataset 'imagenet'.*cifar10"):
        get("imagenet", tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# safe extraction: every bad member is refused before anything is written


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (member("../evil", b"pwned"), "'..'"),
        (member("toy-batches/../../evil", b"pwned"), "'..'"),
        (member("/tmp/evil-absolute", b"pwned"), "absolute"),
        (member("toy-batches/etc", kind=tarfile.SYMTYPE, link="/etc"), "/etc"),
        (member("toy-batches/up", kind=tarfile.SYMTYPE, link="../../.."), "outside"),
        (member("toy-batches/hard", kind=tarfile.LNKTYPE, link="../evil"), "outside"),
        (member("toy-batches/tty", kind=tarfile.CHRTYPE), "device"),
        (member("toy-batches/fifo", kind=tarfile.FIFOTYPE), "device"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink-etc", "symlink-up", "hardlink-up", "chardev", "fifo"],
)
def test_unsafe_archive_refused(server, tmp_path, bad, fragment):
    root = tmp_path / "root"
    body = tarball([member("toy-batches", kind=tarfile.DIRTYPE), member("toy-batches/ok.bin", b"ok"), bad])
    sources = {"toy": Source("toy", (serve(server, "toy.tar.gz", body, folder="toy-batches"),))}
    with pytest.raises(DataError) as exc:
        get("toy", root, sources, log=lambda s: None)
    one_line_error(exc, str(root / "toy" / "toy.tar.gz"), bad[0].name, "refusing", fragment)
    assert files_under(tmp_path) == {"root", "root/toy", "root/toy/toy.tar.gz"}  # nothing extracted anywhere
    assert not Path("/tmp/evil-absolute").exists()


# ---------------------------------------------------------------------------------------------------------------------
# the CLI and the real table (checked offline)


def test_cli_data_get(server, tmp_path, monkeypatch, capsys):
    tar = serve(server, "toy.tar.gz", good_tar(), folder="toy-batches")
    monkeypatch.setattr(get_mod, "SOURCES", {"toy": Source("toy", (tar,))})
    assert main(["data", "get", "toy", "--root", str(tmp_path)]) == 0
    assert f"data.root={tmp_path / 'toy'}" in capsys.readouterr().out
    server.files["/bad.tar.gz"] = b"short"
    monkeypatch.setattr(get_mod, "SOURCES", {"bad": Source("bad", (Archive(f"{server.base}/bad.tar.gz", 9, None),))})
    assert main(["data", "get", "bad", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("locallearn: error: ") and err.count("\n") == 1 and "expected 9" in err


def test_official_table():
    from locallearn.data import cifar, stl10, svhn
    from locallearn.data.datasets import dataset_spec

    assert set(SOURCES) == {"fashion_mnist", "mnist", "cifar10", "cifar100", "svhn", "svhn_extra", "stl10"}
    for name, source in SOURCES.items():
        dataset_spec(name)  # every downloadable dataset is registered
        assert any(root.endswith("/" + source.folder) for root in dataset_spec(name).default_roots), name
        for archive in source.archives:
            assert archive.url.startswith(("http://", "https://")) and archive.size > 1000
            assert archive.sha256 is not None and re.fullmatch(r"[0-9a-f]{64}", archive.sha256)
    assert SOURCES["cifar10"].archives[0].extracts_to == cifar._CIFAR10[0].folder
    assert SOURCES["cifar100"].archives[0].extracts_to == cifar._CIFAR100[0].folder
    assert SOURCES["stl10"].archives[0].extracts_to == stl10.FOLDER
    assert {a.filename for a in SOURCES["svhn_extra"].archives} == {*svhn._FILES_EXTRA["train"], "test_32x32.mat"}
    idx = {f"{p}-{k}-ubyte.gz" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")}
    assert {a.filename for a in SOURCES["mnist"].archives} == {a.filename for a in SOURCES["fashion_mnist"].archives}
    assert {a.filename for a in SOURCES["mnist"].archives} == idx
