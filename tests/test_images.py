"""Disk images by URL (vmrun/images.py, `vmrun pull`): served by an HTTP server on
127.0.0.1 that this file starts and that counts the requests it answers."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import http.server
import lzma
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import zstandard

from conftest import cmdline, toml_value, vmrun, write_stack
from vmrun import images, manifest
from vmrun.errors import HostError, ManifestError
from vmrun.fileconvert import Disk

MIB = 1024 * 1024


def raw_image(first_line: str = "vmrun-test from-url", size: int = MIB) -> bytes:
    """A raw disk whose first line the test guest prints with guest.disk=read."""
    head = (first_line + "\n").encode()
    return head + bytes(size - len(head))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Server:
    """A ThreadingHTTPServer on 127.0.0.1:0 serving `files`; counts the GETs it answered.

    A path in `stall` gets its headers and the first half of its body, then nothing until
    the test ends; a path in `cut` gets half its body and the connection closes; a path in
    `fail` gets that many 503 answers first."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.stall: set[str] = set()
        self.cut: set[str] = set()
        self.fail: dict[str, int] = {}
        self.trickle: set[str] = set()
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                if server.fail.get(self.path):
                    server.fail[self.path] -= 1
                    self.send_error(503)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.stall | server.cut:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    if self.path in server.stall:
                        server.release.wait(60)
                    self.close_connection = True
                    return
                if self.path in server.trickle:
                    for start in range(0, len(body), len(body) // 8):
                        self.wfile.write(body[start:start + len(body) // 8])
                        self.wfile.flush()
                        time.sleep(0.15)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server() -> Iterator[Server]:
    the_server = Server()
    yield the_server
    the_server.close()


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test has its own cache (subprocesses inherit VMRUN_CACHE)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("VMRUN_CACHE", str(path))
    monkeypatch.setattr(images, "BACKOFF", 0.05)  # in-process retries: quick
    return path


def write_manifest(directory: Path, vms: dict[str, dict[str, Any]]) -> Path:
    """A manifest booting a stand-in kernel (never started: enough to load and render)."""
    (directory / "vmlinuz").write_bytes(b"kernel")
    lines = ['name = "img"', "", "[defaults]", 'kernel = "vmlinuz"']
    for vm, settings in vms.items():
        lines += ["", f"[vm.{vm}]"] + [f"{k} = {toml_value(v)}" for k, v in settings.items()]
    path = directory / "img.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def load(directory: Path, vms: dict[str, dict[str, Any]]) -> manifest.Stack:
    return manifest.load(write_manifest(directory, vms))


def cache_entries(cache: Path) -> list[str]:
    """The cache's entries (images), without tmp/ and locks/."""
    return sorted(str(p.relative_to(cache)) for sub in ("sha256", "sha512")
                  for p in (cache / sub).glob("*"))


def tmp_files(cache: Path) -> list[str]:
    return sorted(os.listdir(cache / "tmp")) if (cache / "tmp").is_dir() else []


class Recorder:
    """An images.Progress that keeps what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def waiting(self, url: str) -> None:
        self.events.append(("waiting", url))

    def start(self, url: str, total: int | None) -> None:
        self.events.append(("start", url, str(total)))

    def advance(self, nbytes: int) -> None:
        pass

    def finish(self, url: str, path: Path, nbytes: int, cached: bool) -> None:
        self.events.append(("cached" if cached else "pulled", url, str(nbytes)))


# --- the cache's layout -----------------------------------------------------------------


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VMRUN_CACHE", str(tmp_path / "mine"))
    assert images.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("VMRUN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert images.cache_dir() == tmp_path / "xdg" / "vmrun" / "images"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert images.cache_dir() == tmp_path / "home" / ".cache" / "vmrun" / "images"


def test_cached_path_is_the_checksum(cache: Path) -> None:
    digest = "ab" * 32
    disk = Disk(image=None, format="", size_mib=None, readonly=False,
                url="https://example.org/debian.qcow2", checksum=("sha256", digest))
    assert images.cached_path(disk) == cache / "sha256" / digest
    # two URLs of one file are one entry; a compressed file's entry is its decompressed image
    assert images.cached_path(replace(disk, url="http://mirror/x.img")) == cache / "sha256" / digest
    for url in ("https://e.org/d.raw.xz", "https://e.org/d.qcow2.GZ?token=1",
                "file:///srv/d.img.zst"):
        assert images.cached_path(replace(disk, url=url)) == cache / "sha256" / f"{digest}.img"
    long = replace(disk, checksum=("sha512", "cd" * 64))
    assert images.cached_path(long) == cache / "sha512" / ("cd" * 64)


# --- fetching, in-process ---------------------------------------------------------------


def test_localize_fetches_verifies_and_fills_image_and_format(
        server: Server, tmp_path: Path, cache: Path) -> None:
    data = raw_image()
    server.files["/disk.img"] = data
    url = server.url("/disk.img")
    stack = load(tmp_path, {"a": {"count": 2, "disks": [{"image": url, "sha256": sha256(data)}]},
                            "b": {"disks": [{"image": url, "sha256": sha256(data),
                                             "readonly": True}]}})
    assert all(vm.disks[0].image is None and vm.disks[0].format == "" for vm in stack.vms)
    progress = Recorder()
    local = images.localize(stack, progress)
    target = cache / "sha256" / sha256(data)
    for vm in local.vms:
        assert vm.disks[0].image == target and vm.disks[0].format == "raw"
    assert target.read_bytes() == data
    assert server.requests == ["/disk.img"]  # one URL in three VMs: fetched once
    assert progress.events[0] == ("start", url, str(len(data)))
    assert progress.events[1] == ("pulled", url, str(len(data)))
    assert tmp_files(cache) == []
    # the cache file is read-only, with a fixed mtime (kept overlays see the same base)
    assert target.stat().st_mode & 0o777 == 0o444
    assert target.stat().st_mtime == images.FIXED_MTIME
    # a second run: no request
    again = Recorder()
    assert images.localize(stack, again) == local
    assert server.requests == ["/disk.img"]
    assert again.events == [("cached", url, "0")]


@pytest.mark.parametrize("kind", ["gz", "xz", "zst"])
def test_compressed_images_are_decompressed_once(
        kind: str, server: Server, tmp_path: Path, cache: Path) -> None:
    data = raw_image("vmrun-test compressed")
    packed = {"gz": gzip.compress, "xz": lzma.compress,
              "zst": zstandard.ZstdCompressor().compress}[kind](data)
    server.files[f"/disk.raw.{kind}"] = packed
    stack = load(tmp_path, {"a": {"disks": [{"image": server.url(f"/disk.raw.{kind}"),
                                             "sha256": sha256(packed)}]}})
    disk = images.localize(stack).vms[0].disks[0]
    # the checksum is the published file's; the cache keeps the decompressed image only
    assert disk.image == cache / "sha256" / f"{sha256(packed)}.img"
    assert disk.image.read_bytes() == data and disk.format == "raw"
    assert cache_entries(cache) == [f"sha256/{sha256(packed)}.img"]
    assert tmp_files(cache) == []
    images.localize(stack)
    assert len(server.requests) == 1


def test_zst_without_zstandard_is_refused_clearly(
        server: Server, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packed = zstandard.ZstdCompressor().compress(raw_image())
    server.files["/disk.zst"] = packed
    stack = load(tmp_path, {"a": {"disks": [{"image": server.url("/disk.zst"),
                                             "sha256": sha256(packed)}]}})
    monkeypatch.setitem(sys.modules, "zstandard", None)  # `import zstandard` fails
    with pytest.raises(HostError, match="a .zst image needs the zstandard package"):
        images.localize(stack)
    assert cache_entries(cache) == [] and tmp_files(cache) == []


def test_a_corrupt_compressed_file_is_refused(server: Server, tmp_path: Path,
                                              cache: Path) -> None:
    bad = lzma.compress(raw_image())[:-40]  # truncated, yet its checksum is the manifest's
    server.files["/disk.xz"] = bad
    stack = load(tmp_path, {"a": {"disks": [{"image": server.url("/disk.xz"),
                                             "sha256": sha256(bad)}]}})
    with pytest.raises(ManifestError, match="not a valid .xz file"):
        images.localize(stack)
    assert cache_entries(cache) == [] and tmp_files(cache) == []


def test_wrong_checksum_keeps_nothing(server: Server, tmp_path: Path, cache: Path) -> None:
    data = raw_image()
    server.files["/disk.img"] = data
    url = server.url("/disk.img")
    stack = load(tmp_path, {"a": {"disks": [{"image": url, "sha512": "0" * 128}]}})
    with pytest.raises(ManifestError) as info:
        images.localize(stack)
    (line,) = info.value.lines()
    assert f"{tmp_path / 'img.toml'}:7: vm.a.disks: disks[0]: the file at {url} " in line
    assert f"expected {'0' * 128}, found {hashlib.sha512(data).hexdigest()}" in line
    assert cache_entries(cache) == [] and tmp_files(cache) == []
    # disks given in [defaults]: the problem is at that line
    path = tmp_path / "img.toml"
    path.write_text(f'name = "img"\n[defaults]\nkernel = "vmlinuz"\n'
                    f'disks = [{{ image = "{url}", sha512 = "{"0" * 128}" }}]\n[vm.a]\n')
    with pytest.raises(ManifestError, match=r"img.toml:4: defaults.disks: disks\[0\]: "):
        images.localize(manifest.load(path))


def test_the_fetched_image_is_checked_against_the_manifest(
        server: Server, tmp_path: Path, cache: Path) -> None:
    data = raw_image(size=3 * MIB)
    server.files["/disk.img"] = data
    url, digest = server.url("/disk.img"), sha256(data)
    stack = load(tmp_path, {"a": {"disks": [{"image": url, "sha256": digest,
                                             "format": "qcow2"}]}})
    with pytest.raises(ManifestError, match=r"is raw, not qcow2: expected format = \"raw\""):
        images.localize(stack)
    stack = load(tmp_path, {"a": {"disks": [{"image": url, "sha256": digest, "size": "2M"}]}})
    with pytest.raises(ManifestError, match=r"img.toml:7: .*overlay is smaller.*"
                                            r"expected size at least the image's \(3M\), "
                                            r"found 2M"):
        images.localize(stack)
    stack = load(tmp_path, {"a": {"disks": [{"image": url, "sha256": digest, "size": "4M"}]}})
    assert images.localize(stack).vms[0].disks[0].size_mib == 4
    assert len(server.requests) == 1  # the image stayed in the cache: it was right


def test_retries_5xx_not_4xx(server: Server, tmp_path: Path, cache: Path) -> None:
    data = raw_image()
    server.files["/flaky.img"] = data
    server.fail["/flaky.img"] = 2
    stack = load(tmp_path, {"a": {"disks": [{"image": server.url("/flaky.img"),
                                             "sha256": sha256(data)}]}})
    assert images.localize(stack).vms[0].disks[0].image is not None
    assert server.requests == ["/flaky.img"] * 3
    stack = load(tmp_path, {"a": {"disks": [{"image": server.url("/gone.img"),
                                             "sha256": "2" * 64}]}})
    with pytest.raises(HostError, match=r"cannot download .*/gone.img: HTTP 404"):
        images.localize(stack)
    assert server.requests[3:] == ["/gone.img"]


def test_a_short_body_is_retried_then_refused_and_leaves_no_file(
        server: Server, tmp_path: Path, cache: Path) -> None:
    data = raw_image()
    server.files["/cut.img"] = data
    server.cut.add("/cut.img")
    stack = load(tmp_path, {"a": {"disks": [{"image": server.url("/cut.img"),
                                             "sha256": sha256(data)}]}})
    with pytest.raises(HostError, match="closed 524288 bytes before the end") as info:
        images.localize(stack)
    assert "vmrun pull" in (info.value.hint or "")
    assert len(server.requests) == images.ATTEMPTS
    assert cache_entries(cache) == [] and tmp_files(cache) == []


def test_file_urls(tmp_path: Path, cache: Path) -> None:
    data = raw_image()
    (tmp_path / "disk.img.gz").write_bytes(gzip.compress(data))
    digest = sha256((tmp_path / "disk.img.gz").read_bytes())
    stack = load(tmp_path, {"a": {"disks": [{"image": f"file://{tmp_path}/disk.img.gz",
                                             "sha256": digest}]}})
    assert images.localize(stack).vms[0].disks[0].image.read_bytes() == data  # type: ignore
    stack = load(tmp_path, {"a": {"disks": [{"image": f"file://{tmp_path}/nothing.img",
                                             "sha256": digest}]}})
    with pytest.raises(HostError, match="cannot download file://.*nothing.img"):
        images.localize(stack)


def test_render_fills_the_cache_path_without_fetching(
        server: Server, tmp_path: Path, cache: Path) -> None:
    data = raw_image()
    server.files["/disk.qcow2.xz"] = data
    url = server.url("/disk.qcow2.xz")
    stack = load(tmp_path, {"a": {"disks": [{"image": url, "sha256": sha256(data),
                                             "readonly": True}]}})
    disk = images.localize(stack, fetch=False).vms[0].disks[0]
    assert disk.image == cache / "sha256" / f"{sha256(data)}.img"
    assert disk.format == "qcow2"  # by the name, until it is fetched
    result = vmrun("render", str(tmp_path / "img.toml"), timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"{cache}/sha256/{sha256(data)}.img" in result.stdout
    assert vmrun("check", str(tmp_path / "img.toml"), timeout=60).returncode == 0
    assert server.requests == [] and not cache.exists()


# --- local images with a checksum -------------------------------------------------------


def test_local_image_checksum_verified_once(tmp_path: Path, cache: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    data = raw_image()
    image = tmp_path / "base.img"
    image.write_bytes(data)
    hashed: list[Path] = []
    real = images.hash_file

    def counting(path: Path, algo: str) -> tuple[str, os.stat_result]:
        hashed.append(path)
        return real(path, algo)

    monkeypatch.setattr(images, "hash_file", counting)
    stack = load(tmp_path, {"a": {"disks": [{"image": "base.img", "sha256": sha256(data)}]},
                            "b": {"disks": [{"image": "base.img", "sha256": sha256(data)}]}})
    assert images.localize(stack) == stack
    assert hashed == [image]  # one file in two VMs: hashed once
    images.localize(stack)
    assert hashed == [image]  # remembered: not hashed again
    assert str(image) in (cache / "verified.json").read_text()
    image.write_bytes(data)  # rewritten (same bytes): hashed again
    images.localize(stack)
    assert hashed == [image, image]
    image.write_bytes(raw_image("changed"))
    with pytest.raises(ManifestError, match=rf"base.img does not match its sha256: "
                                            rf"expected {sha256(data)}, found "):
        images.localize(stack)


def test_a_stack_without_checksums_leaves_the_cache_alone(tmp_path: Path,
                                                          cache: Path) -> None:
    (tmp_path / "base.img").write_bytes(raw_image())
    stack = load(tmp_path, {"a": {"disks": [{"image": "base.img"}, {"size": "8M"}]}})
    assert images.localize(stack) is stack
    assert not cache.exists()


# --- the lock and the temporary files ---------------------------------------------------


def test_sweep_removes_tmp_files_nobody_writes(cache: Path) -> None:
    (cache / "tmp").mkdir(parents=True)
    (cache / "locks").mkdir()
    busy, left = f"sha256-{'a' * 64}.x1.part", f"sha256-{'b' * 64}.x2.part"
    for name in (busy, left):
        (cache / "tmp" / name).write_bytes(b"half")
    fd = os.open(cache / "locks" / f"sha256-{'a' * 64}.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert images.sweep(cache) == [cache / "tmp" / left]
        assert tmp_files(cache) == [busy]
    finally:
        os.close(fd)
    images.sweep(cache)
    assert tmp_files(cache) == []


def test_a_fetch_waits_for_the_lock_of_its_entry(server: Server, tmp_path: Path,
                                                 cache: Path) -> None:
    data = raw_image()
    server.files["/disk.img"] = data
    stack = load(tmp_path, {"a": {"disks": [{"image": server.url("/disk.img"),
                                             "sha256": sha256(data)}]}})
    (cache / "locks").mkdir(parents=True)
    fd = os.open(cache / "locks" / f"sha256-{sha256(data)}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    progress = Recorder()
    worker = threading.Thread(target=images.localize, args=(stack, progress))
    worker.start()
    time.sleep(0.5)
    assert progress.events == [("waiting", server.url("/disk.img"))]
    assert server.requests == []
    os.close(fd)
    worker.join(30)
    assert server.requests == ["/disk.img"]


# --- vmrun pull, as a process -----------------------------------------------------------


def test_pull_downloads_then_makes_no_request(server: Server, tmp_path: Path,
                                              cache: Path) -> None:
    data = raw_image(size=2 * MIB)
    server.files.update({"/d.raw": data, "/d.raw.gz": gzip.compress(data),
                         "/d.raw.xz": lzma.compress(data)})
    urls = {path: server.url(path) for path in server.files}
    manifest_path = write_manifest(tmp_path, {
        name: {"disks": [{"image": urls[path], "sha256": sha256(server.files[path])}]}
        for name, path in (("plain", "/d.raw"), ("gz", "/d.raw.gz"), ("xz", "/d.raw.xz"))})
    first = vmrun("pull", str(manifest_path), timeout=60)
    assert first.returncode == 0, first.stderr
    assert sorted(first.stdout.splitlines()) == sorted(
        f"pulled {url} ({len(server.files[path]) / MIB:.1f} MiB)" for path, url in urls.items())
    assert f"vmrun: pulling {urls['/d.raw']} (2.0 MiB)" in first.stderr  # not a terminal
    assert len(server.requests) == 3
    assert len(cache_entries(cache)) == 3 and tmp_files(cache) == []
    second = vmrun("pull", str(manifest_path), timeout=60)
    assert second.returncode == 0, second.stderr
    assert sorted(second.stdout.splitlines()) == sorted(f"cached {url}" for url in urls.values())
    assert len(server.requests) == 3  # no request at all


def test_two_concurrent_pulls_fetch_once(server: Server, tmp_path: Path, cache: Path) -> None:
    data = raw_image()
    server.files["/slow.img"] = data
    server.trickle.add("/slow.img")
    manifest_path = write_manifest(tmp_path, {"a": {"disks": [
        {"image": server.url("/slow.img"), "sha256": sha256(data)}]}})
    argv = [sys.executable, "-m", "vmrun", "pull", str(manifest_path)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert sorted(out.split(" ")[0] for out, _ in outputs) == ["cached", "pulled"]
    assert server.requests == ["/slow.img"]


def test_pull_wrong_checksum_is_exit_2_and_caches_nothing(server: Server, tmp_path: Path,
                                                          cache: Path) -> None:
    data = raw_image()
    server.files["/disk.img"] = data
    url, wrong = server.url("/disk.img"), sha256(b"something else")
    manifest_path = write_manifest(tmp_path, {"a": {"disks": [{"image": url, "sha256": wrong}]}})
    result = vmrun("pull", str(manifest_path), timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"vmrun: error: {manifest_path}:7: vm.a.disks: disks[0]: the file at {url} " \
           f"does not match its sha256: expected {wrong}, found {sha256(data)}" in result.stderr
    assert "Traceback" not in result.stderr
    assert cache_entries(cache) == [] and tmp_files(cache) == []


def test_a_killed_pull_leaves_nothing_in_the_cache(server: Server, tmp_path: Path,
                                                   cache: Path) -> None:
    data = raw_image(size=4 * MIB)
    server.files["/stall.img"] = server.files["/good.img"] = data
    server.stall.add("/stall.img")
    entry = cache / "sha256" / sha256(data)
    manifest_path = write_manifest(tmp_path, {"a": {"disks": [
        {"image": server.url("/stall.img"), "sha256": sha256(data)}]}})
    proc = subprocess.Popen([sys.executable, "-m", "vmrun", "pull", str(manifest_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    # A quarter on disk: mid-download.  Not the half the server sends: the last few KiB of
    # it may stay in the writer's buffer, and the test would wait for them in vain.
    while not any((cache / "tmp" / name).stat().st_size >= MIB
                  for name in tmp_files(cache)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert not entry.exists() and cache_entries(cache) == []
    (garbage,) = tmp_files(cache)
    assert garbage.startswith(f"sha256-{sha256(data)}.")
    # the next run removes the garbage and fetches the image (here from a server that works)
    manifest_path = write_manifest(tmp_path, {"a": {"disks": [
        {"image": server.url("/good.img"), "sha256": sha256(data)}]}})
    result = vmrun("pull", str(manifest_path), timeout=60)
    assert result.returncode == 0, result.stderr
    assert entry.read_bytes() == data and tmp_files(cache) == []


def test_pull_unreachable_url_is_exit_3(tmp_path: Path, cache: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/disk.img"
    manifest_path = write_manifest(tmp_path, {"a": {"disks": [{"image": url,
                                                               "sha256": "1" * 64}]}})
    result = vmrun("pull", str(manifest_path), timeout=60)
    assert result.returncode == 3, result.stderr
    assert f"vmrun: error: cannot download {url}: Connection refused" in result.stderr
    assert "hint:" in result.stderr and "Traceback" not in result.stderr
    assert cache_entries(cache) == [] and tmp_files(cache) == []


def test_pull_without_url_images(tmp_path: Path) -> None:
    manifest_path = write_manifest(tmp_path, {"a": {}})
    result = vmrun("pull", str(manifest_path), timeout=60)
    assert result.returncode == 0 and result.stdout == ""
    assert "has no image by URL" in result.stderr


# --- a real guest -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_up_boots_a_guest_on_an_image_by_url(guest: Path, server: Server, tmp_path: Path,
                                             cache: Path) -> None:
    data = raw_image("vmrun-test from-url")
    server.files["/disk.img.xz"] = packed = lzma.compress(data)
    manifest_path = write_stack(tmp_path, guest, {"box": {
        "cmdline": cmdline(extra="guest.disk=read"),
        "disks": [{"image": server.url("/disk.img.xz"), "sha256": sha256(packed)}]}})
    result = vmrun("up", str(manifest_path), timeout=55)
    assert result.returncode == 0, result.stderr
    assert "guest: disk says: vmrun-test from-url" in result.stdout
    assert f"vmrun: pulled {server.url('/disk.img.xz')}" in result.stderr
    assert server.requests == ["/disk.img.xz"]
