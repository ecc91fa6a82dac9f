"""Disk images by URL: fetched once into a content-addressed cache, verified, decompressed.

Why it is built this way:

- The cache is addressed by the checksum the manifest gives (`<cache>/sha256/<hex>`), so
  the file a disk will use is known before any request: a second run finds it and makes
  no request, two URLs of the same file (or one URL in several VMs) share one entry, and
  `vmrun render` names it without fetching anything.
- A file enters the cache only by `os.replace` from `<cache>/tmp/`, after its checksum
  matched (and after decompression): whatever is at an entry's name is complete and
  verified.  A wrong or interrupted download never lands there; what a killed process
  left in `tmp/` is removed by the next run (a file there is garbage once nobody holds
  its entry's lock).
- One `flock` per entry (`<cache>/locks/`): two `vmrun pull` or `up` fetching the same
  image do not fight, the second waits and then finds it; different images are fetched
  independently.
- urllib (stdlib), because one streaming GET needs no new dependency: timeouts on
  connect and on every read, a few retries with backoff on connection errors and 5xx
  only (a 404 or a checksum mismatch will not fix itself), proxies from the environment.
- Compressed images (.xz, .gz, .zst by the URL's name) are decompressed once into the
  cache; the checksum is the one of the file as published, checked before decompressing.
  .zst needs the `zstandard` package.
- A local image with a checksum is hashed once: the match is remembered in
  `<cache>/verified.json` by path, size, mtime, ctime, inode and device, so a large image
  is not read again on every `up`.
- Cache files get a fixed modification time: a re-downloaded image (after the cache was
  cleared) is then the same base for the overlays kept in a stack's state (disks.py
  refuses an overlay whose base's size or mtime changed).

Layout of the cache (`$VMRUN_CACHE`, else `$XDG_CACHE_HOME/vmrun/images`, else
`~/.cache/vmrun/images`):

    sha256/<hex>          an image as published, whose sha256 is <hex> (sha512/ alike)
    sha256/<hex>.img      the image decompressed from a .xz/.gz/.zst file whose sha256 is
                          <hex> (the compressed file is not kept)
    tmp/<algo>-<hex>.*.part   downloads and decompressions under way (or interrupted);
                          tmp/verified.*.part, the next verified.json
    locks/<algo>-<hex>.lock   one lock per entry; locks/verified.lock for verified.json
    verified.json         local images whose checksum matched, and their identity
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import http.client
import json
import lzma
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from vmrun import __version__
from vmrun.convert import Invalid
from vmrun.errors import HostError, ManifestError, Problem
from vmrun.fileconvert import Disk, image_format, virtual_size

if TYPE_CHECKING:
    from vmrun.manifest import VM, Stack

TIMEOUT = 30.0  # seconds, for connecting and for each read
ATTEMPTS = 3  # per URL, on connection errors and 5xx
BACKOFF = 1.0  # seconds before the 2nd attempt, doubled after each
CHUNK = 1024 * 1024
MIB = 1024 * 1024
FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z, for every file of the cache
COMPRESSIONS = {".xz": "xz", ".gz": "gz", ".zst": "zst"}


class Progress(Protocol):
    """What `localize` reports while it fetches (the CLI draws or prints it)."""

    def waiting(self, url: str) -> None:
        """Another process is fetching the same image; this one waits for it."""

    def start(self, url: str, total: int | None) -> None:
        """A download begins (again, after a retry); `total` from Content-Length."""

    def advance(self, nbytes: int) -> None:
        """`nbytes` more were received."""

    def finish(self, url: str, path: Path, nbytes: int, cached: bool) -> None:
        """The image is in the cache: fetched now (`nbytes` received) or found there."""


# --- the cache --------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where images are cached: $VMRUN_CACHE, else $XDG_CACHE_HOME/vmrun/images, else
    ~/.cache/vmrun/images."""
    if os.environ.get("VMRUN_CACHE"):
        return Path(os.environ["VMRUN_CACHE"]).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "vmrun" / "images"


@dataclass(frozen=True)
class Entry:
    """A cache entry: the file whose checksum is `digest`, decompressed if `compression`."""

    algo: str
    digest: str
    compression: str  # "" | "xz" | "gz" | "zst"

    @property
    def name(self) -> str:
        return f"{self.algo}-{self.digest}"

    def path(self, cache: Path) -> Path:
        suffix = ".img" if self.compression else ""
        return cache / self.algo / f"{self.digest}{suffix}"


def compression(url: str) -> str:
    """"xz", "gz", "zst" from the name the URL ends with, or ""."""
    path = urlsplit(url).path.lower()
    return next((kind for suffix, kind in COMPRESSIONS.items() if path.endswith(suffix)), "")


def entry(disk: Disk) -> Entry:
    assert disk.url is not None and disk.checksum is not None, "a URL disk has a checksum"
    algo, digest = disk.checksum
    return Entry(algo, digest, compression(disk.url))


def cached_path(disk: Disk, cache: Path | None = None) -> Path:
    """The file a URL disk uses, fetched or not: `<cache>/<algo>/<hex>[.img]`."""
    return entry(disk).path(cache or cache_dir())


def _cache_error(cache: Path, exc: OSError) -> HostError:
    return HostError(f"cannot write the image cache {cache}: {exc.strerror}",
                     hint="set VMRUN_CACHE to a writable directory with free space")


def _make_dirs(cache: Path) -> None:
    try:
        for sub in ("tmp", "locks", "sha256", "sha512"):
            (cache / sub).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cache_error(cache, exc) from None


@contextlib.contextmanager
def _locked(path: Path, on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing); `on_wait` if it is busy."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _cache_error(path.parent.parent, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def sweep(cache: Path) -> list[Path]:
    """Remove what interrupted downloads left in `<cache>/tmp/`: each file whose entry's
    lock nobody holds.  Returns the removed files."""
    removed: list[Path] = []
    try:
        names = sorted(os.listdir(cache / "tmp"))
    except OSError:
        return removed
    for name in names:
        lock = cache / "locks" / f"{name.split('.', 1)[0]}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # being written right now
        else:
            with contextlib.suppress(FileNotFoundError):
                (cache / "tmp" / name).unlink()
                removed.append(cache / "tmp" / name)
        finally:
            os.close(fd)
    return removed


def _publish(tmp: Path, target: Path) -> None:
    """Make the complete file `tmp` the cache entry `target` (read-only, fixed mtime)."""
    os.chmod(tmp, 0o444)
    os.utime(tmp, (FIXED_MTIME, FIXED_MTIME))
    os.replace(tmp, target)
    dirfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


@contextlib.contextmanager
def _tmpfile(cache: Path, entry: Entry) -> Iterator[tuple[Path, IO[bytes]]]:
    """A new file in `<cache>/tmp/`, removed on the way out unless it was published."""
    try:
        fd, name = tempfile.mkstemp(prefix=f"{entry.name}.", suffix=".part",
                                    dir=cache / "tmp")
    except OSError as exc:
        raise _cache_error(cache, exc) from None
    path = Path(name)
    try:
        with os.fdopen(fd, "w+b") as out:
            yield path, out
    finally:
        path.unlink(missing_ok=True)


# --- errors, located in the manifest ----------------------------------------------------


@dataclass(frozen=True)
class Where:
    """A disk's place in the manifest, for the problems found once it is fetched."""

    stack: Stack
    vm: VM
    index: int

    def error(self, message: str, *, expected: str | None = None, found: str | None = None,
              hint: str | None = None) -> ManifestError:
        own = ("vm", self.vm.group, "disks")
        keypath = own if own in self.stack.lines or \
            ("defaults", "disks") not in self.stack.lines else ("defaults", "disks")
        return ManifestError([Problem(
            f"disks[{self.index}]: {message}", file=self.stack.path,
            line=self.stack.line_of(*keypath), key=".".join(keypath), expected=expected,
            found=found, hint=hint)])


def _unreachable(url: str, reason: str, answered: bool = False) -> HostError:
    hint = ("check the URL in the manifest" if answered else "check the network (and any "
            "proxy)") + "; `vmrun pull FILE` fetches a stack's images ahead of time, e.g. " \
        "into a CI cache"
    return HostError(f"cannot download {url}: {reason}", hint=hint)


# --- downloading ------------------------------------------------------------------------


def _get(url: str, out: IO[bytes], algo: str, progress: Progress | None) -> tuple[str, int]:
    """Stream `url` into `out`, hashing it; (hex digest, bytes).  Retries connection
    errors and 5xx answers a few times; HostError when it cannot."""
    retry = urlsplit(url).scheme.lower() != "file"
    request = urllib.request.Request(url, headers={"User-Agent": f"vmrun/{__version__}"})
    for attempt in range(ATTEMPTS):
        out.seek(0)
        out.truncate()
        hasher = hashlib.new(algo)
        nbytes = 0
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                if progress:
                    progress.start(url, total)
                read = getattr(response, "read1", response.read)
                while chunk := read(CHUNK):
                    hasher.update(chunk)
                    _write(out, chunk)
                    nbytes += len(chunk)
                    if progress:
                        progress.advance(len(chunk))
                if total is not None and nbytes < total:
                    raise http.client.IncompleteRead(b"", total - nbytes)
            _write(out)
            return hasher.hexdigest(), nbytes
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == ATTEMPTS - 1:
                raise _unreachable(url, f"HTTP {exc.code} {exc.reason}",
                                   answered=exc.code < 500) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            if not retry or attempt == ATTEMPTS - 1:
                raise _unreachable(url, _reason(exc)) from None
        except ValueError as exc:  # a URL urllib cannot use
            raise _unreachable(url, str(exc)) from None
        time.sleep(BACKOFF * 2 ** attempt)
    raise AssertionError("unreachable")


def _reason(exc: Exception) -> str:
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return getattr(reason, "strerror", None) or str(reason)
    if isinstance(exc, http.client.IncompleteRead):
        return f"the connection closed {exc.expected} bytes before the end"
    if isinstance(exc, TimeoutError):
        return f"no data for {TIMEOUT:g} s"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class _Corrupt(Exception):
    """A compressed file that does not decompress."""


def _write(out: IO[bytes], data: bytes | None = None) -> None:
    """Write `data` to a file of the cache, or flush and fsync it when None."""
    try:
        if data is None:
            out.flush()
            os.fsync(out.fileno())
        else:
            out.write(data)
    except OSError as exc:
        raise _cache_error(cache_dir(), exc) from None


class _Reader(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...

    def close(self) -> None: ...


def _decompressor(kind: str, source: IO[bytes]) -> tuple[_Reader, tuple[type[Exception], ...]]:
    """A reader of the decompressed `source`, and the errors it raises on bad input."""
    errors: tuple[type[Exception], ...] = (lzma.LZMAError, gzip.BadGzipFile, EOFError)
    if kind == "xz":
        return lzma.LZMAFile(source), errors  # noqa: SIM115 (closed by the caller)
    if kind == "gz":
        return gzip.GzipFile(fileobj=source), errors  # noqa: SIM115
    try:
        import zstandard
    except ImportError:
        raise HostError("a .zst image needs the zstandard package, which is missing",
                        hint="pip install zstandard (vmrun's dependencies have it), "
                             "or use the .xz or uncompressed image") from None
    reader = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)
    return reader, (*errors, zstandard.ZstdError)


def _decompress(kind: str, source: IO[bytes], out: IO[bytes]) -> None:
    """Stream the `kind`-compressed `source` into `out`; _Corrupt when it is not valid."""
    source.seek(0)
    reader, errors = _decompressor(kind, source)
    try:
        with contextlib.closing(reader):
            while chunk := reader.read(CHUNK):
                _write(out, chunk)
    except errors as exc:
        raise _Corrupt(str(exc) or "truncated") from None
    _write(out)


def _fetch(cache: Path, disk: Disk, where: Where, progress: Progress | None) -> Path:
    """The cache file of a URL disk, downloaded, verified and decompressed when missing."""
    assert disk.url is not None
    the_entry = entry(disk)
    target = the_entry.path(cache)
    if target.exists():
        if progress:
            progress.finish(disk.url, target, 0, True)
        return target
    _make_dirs(cache)
    lock = cache / "locks" / f"{the_entry.name}.lock"
    with _locked(lock, lambda: progress.waiting(disk.url or "") if progress else None):
        if target.exists():  # fetched by whoever held the lock
            if progress:
                progress.finish(disk.url, target, 0, True)
            return target
        with _tmpfile(cache, the_entry) as (tmp, out):
            got, nbytes = _get(disk.url, out, the_entry.algo, progress)
            if got != the_entry.digest:
                raise where.error(
                    f"the file at {disk.url} does not match its {the_entry.algo}",
                    expected=the_entry.digest, found=got,
                    hint="nothing was kept in the cache; if the file changed on purpose, "
                         f"put its new {the_entry.algo} in the manifest")
            if not the_entry.compression:
                _publish(tmp, target)
            else:
                with _tmpfile(cache, the_entry) as (raw, raw_out):
                    try:
                        _decompress(the_entry.compression, out, raw_out)
                    except _Corrupt as exc:
                        raise where.error(f"{disk.url} is not a valid .{the_entry.compression} "
                                          f"file ({exc})") from None
                    _publish(raw, target)
    if progress:
        progress.finish(disk.url, target, nbytes, False)
    return target


# --- local images with a checksum -------------------------------------------------------


def hash_file(path: Path, algo: str) -> tuple[str, os.stat_result]:
    """The hex digest of the file and its stat before reading (to remember the match)."""
    with open(path, "rb") as source:
        before = os.fstat(source.fileno())
        digest = hashlib.file_digest(source, algo).hexdigest()
    return digest, before


def _identity(st: os.stat_result, checksum: tuple[str, str]) -> dict[str, object]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "ino": st.st_ino, "dev": st.st_dev, "checksum": ":".join(checksum)}


def _verified(cache: Path) -> dict[str, object]:
    try:
        data = json.loads((cache / "verified.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember(cache: Path, path: Path, record: dict[str, object]) -> None:
    """Add the match to verified.json (entries of vanished files dropped).  Best effort:
    a cache that cannot be written costs only a hash on the next run."""
    try:
        _make_dirs(cache)
        with _locked(cache / "locks" / "verified.lock"):
            data = {key: value for key, value in _verified(cache).items()
                    if os.path.exists(key)}
            data[str(path)] = record
            fd, name = tempfile.mkstemp(prefix="verified.", suffix=".part",
                                        dir=cache / "tmp")
            with os.fdopen(fd, "w") as out:
                json.dump(data, out, indent=1, sort_keys=True)
            os.replace(name, cache / "verified.json")
    except (OSError, HostError):
        pass


def _verify_local(cache: Path, disk: Disk, where: Where) -> None:
    """Check a local image against its checksum, unless the same file matched before."""
    assert disk.image is not None and disk.checksum is not None
    algo, digest = disk.checksum
    try:
        current = _identity(os.stat(disk.image), disk.checksum)
        if _verified(cache).get(str(disk.image)) == current:
            return
        got, before = hash_file(disk.image, algo)
    except OSError as exc:
        raise where.error(f"cannot read {disk.image}: {exc.strerror}") from None
    if got != digest:
        raise where.error(f"{disk.image} does not match its {algo}", expected=digest,
                          found=got, hint=f"if the image changed on purpose, put its new "
                                          f"{algo} in the manifest")
    after = os.stat(disk.image)
    if _identity(after, disk.checksum) == _identity(before, disk.checksum):
        _remember(cache, disk.image, _identity(after, disk.checksum))


# --- the stack --------------------------------------------------------------------------


def _guess_format(disk: Disk) -> str:
    """A URL disk's format before it is fetched: the manifest's, else by its name."""
    assert disk.url is not None
    path = urlsplit(disk.url).path.lower()
    kind = compression(disk.url)
    if kind:
        path = path[: -len(kind) - 1]
    return disk.format or ("qcow2" if path.endswith(".qcow2") else "raw")


def _checked(disk: Disk, path: Path, where: Where) -> Disk:
    """The URL disk with `image` and `format` filled, checked against the manifest."""
    try:
        found, size = image_format(path), virtual_size(path)
    except Invalid as exc:
        raise where.error(f"the image from {disk.url} is unusable", expected=exc.expected,
                          hint="nothing is wrong with the download: its checksum matched"
                          ) from None
    if disk.format == "qcow2" and found != "qcow2":
        raise where.error(f"the image from {disk.url} is {found}, not qcow2",
                          expected='format = "raw" (or no format)', found='format = "qcow2"')
    if disk.size_mib is not None and disk.size_mib * MIB < size:
        raise where.error(f"the overlay is smaller than the image from {disk.url}",
                          expected=f"size at least the image's ({-(-size // MIB)}M)",
                          found=f"{disk.size_mib}M")
    return replace(disk, image=path, format=disk.format or found)


def localize(stack: Stack, progress: Progress | None = None, *, fetch: bool = True) -> Stack:
    """The stack with every URL disk's `image` set to its cache file and its `format`
    known, each image fetched and verified first; local images with a checksum verified.
    Nothing of the stack is started before this returns.

    With fetch=False (for `vmrun render`) nothing is fetched nor verified: a URL disk gets
    its cache path, and a format from the manifest, the cached file or the URL's name."""
    if not any(disk.url or disk.checksum for vm in stack.vms for disk in vm.disks):
        return stack
    cache = cache_dir()
    if fetch and (cache / "tmp").is_dir():
        sweep(cache)
    done: dict[Path, Path] = {}  # entry -> its file, fetched in this call
    verified: set[Path] = set()
    vms = []
    for vm in stack.vms:
        disks = []
        for index, disk in enumerate(vm.disks):
            where = Where(stack, vm, index)
            if disk.url is not None and not fetch:
                path = cached_path(disk, cache)
                if path.exists():
                    disk = _checked(disk, path, where)
                else:
                    disk = replace(disk, image=path, format=_guess_format(disk))
            elif disk.url is not None:
                key = cached_path(disk, cache)
                if key not in done:
                    done[key] = _fetch(cache, disk, where, progress)
                disk = _checked(disk, done[key], where)
            elif fetch and disk.checksum and disk.image and disk.image not in verified:
                _verify_local(cache, disk, where)
                verified.add(disk.image)
            disks.append(disk)
        vms.append(replace(vm, disks=tuple(disks)))
    return replace(stack, vms=tuple(vms))
