"""Shared folders (`shares`, virtiofs): the manifest key and its errors, the domain XML,
the cloud-config part that mounts them, the driver's read-only bind mounts, and real
guests (the test guest, kernel boot) reading and writing host directories."""

from __future__ import annotations

import email
import email.policy
import gzip
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import Up, cmdline, last_run, vmrun, write_stack
from conftest import load_text as load
from conftest import problems_of_text as problems
from vmrun import domain, seed, shares, userdata
from vmrun.errors import HostError
from vmrun.layout import VMPaths

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "src").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "afile").write_text("not a directory\n")
    (tmp_path / "user.yaml").write_text("#cloud-config\nbootcmd:\n  - echo mine\n")
    return tmp_path


# --- the manifest -------------------------------------------------------------------------

@pytest.mark.timeout(10)
def test_shares_are_resolved_and_tagged(files: Path) -> None:
    stack = load(files, textwrap.dedent("""\
        [vm.a]
        kernel = "vmlinuz"
        shares = [{ host = "./src", guest = "/src" },
                  { host = "data", guest = "/mnt//data/", readonly = true }]
        [vm.b]
        kernel = "vmlinuz"
        """))
    a, b = stack.vms
    assert [(s.host, s.guest, s.readonly, s.tag) for s in a.shares] == [
        (files / "src", "/src", False, "share0"),
        (files / "data", "/mnt/data", True, "share1")]
    assert b.shares == ()


@pytest.mark.timeout(10)
def test_missing_host_directory_is_an_error_with_its_line(files: Path) -> None:
    found = problems(files, '[vm.a]\nkernel = "vmlinuz"\n\n'
                            'shares = [{ host = "nowhere", guest = "/x" }]\n')
    assert len(found) == 1, found
    assert found[0].startswith(f"{files / 's.toml'}:4: vm.a.shares: invalid value in "
                               "shares[0].host"), found
    assert f"an existing directory (looked for {files / 'nowhere'})" in found[0]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("entry", "fragment"), [
    ('{ host = "src", guest = "src" }', "shares[0].guest: expected an absolute path"),
    ('{ host = "src", guest = "/" }', "shares[0].guest: expected an absolute path"),
    ('{ host = "src", guest = "/a/../b" }', "without .."),
    ('{ host = "afile", guest = "/x" }', "shares[0].host: expected a directory"),
    ('{ host = "src" }', "no guest"),
    ('{ host = "src", guest = "/x", readonly = "yes" }', "shares[0].readonly"),
    ('{ host = "src", guest = "/x", read_only = true }', 'did you mean "readonly"?'),
    ('{ host = "src", guest = "/x" }, { host = "data", guest = "/x/" }',
     "shares[1].guest: expected one shared folder per guest path"),
    ('"src"', "shares[0]: expected a table"),
])
def test_bad_share_entries(files: Path, entry: str, fragment: str) -> None:
    found = problems(files, f'[vm.a]\nkernel = "vmlinuz"\nshares = [{entry}]\n')
    assert len(found) == 1 and "s.toml:3: vm.a.shares" in found[0], found
    assert fragment in found[0], found


@pytest.mark.timeout(30)
def test_check_exits_2_with_the_line(files: Path) -> None:
    manifest_path = files / "s.toml"
    manifest_path.write_text('[vm.a]\nkernel = "vmlinuz"\n'
                             'shares = [{ host = "gone", guest = "/gone" }]\n')
    proc = vmrun("check", str(manifest_path), timeout=30)
    assert proc.returncode == 2, proc
    assert f"{manifest_path}:3: vm.a.shares" in proc.stderr and "gone" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(10)
def test_shares_need_root_and_virtiofsd(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = load(files, '[vm.a]\nkernel = "vmlinuz"\nshares = [{ host = "src", guest = "/s" }]\n')
    assert shares.require(load(files, '[vm.a]\nkernel = "vmlinuz"\n')) is None
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(HostError, match="need root"):
        shares.require(stack)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shares, "DESCRIPTOR_DIRS", (files,))
    monkeypatch.setattr(shares, "VIRTIOFSD", files / "no-virtiofsd")
    with pytest.raises(HostError, match="virtiofsd"):
        shares.require(stack)


@pytest.mark.timeout(10)
def test_virtiofsd_is_found_through_the_vhost_user_descriptors(
        files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc, share = files / "etc", files / "share"
    etc.mkdir()
    share.mkdir()
    binary = files / "my-virtiofsd"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    (share / "50-qemu-virtiofsd.json").write_text('{"type": "fs", "binary": "/nonexistent"}')
    (share / "10-gpu.json").write_text(f'{{"type": "gpu", "binary": "{binary}"}}')
    (etc / "50-qemu-virtiofsd.json").write_text(f'{{"type": "fs", "binary": "{binary}"}}')
    monkeypatch.setattr(shares, "DESCRIPTOR_DIRS", (etc, share))
    assert shares.find_virtiofsd() == binary
    (etc / "50-qemu-virtiofsd.json").unlink()
    assert shares.find_virtiofsd() == shares.VIRTIOFSD  # a binary that is not there


# --- domain XML and the cloud-init seed ---------------------------------------------------

@pytest.mark.timeout(10)
def test_xml_has_shared_memory_and_one_filesystem_per_share(files: Path) -> None:
    stack = load(files, '[vm.a]\nkernel = "vmlinuz"\n'
                        'shares = [{ host = "src", guest = "/s" }, '
                        '{ host = "data", guest = "/d", readonly = true }]\n[vm.b]\n'
                        'kernel = "vmlinuz"\n')
    a, b = stack.vms
    paths = VMPaths("a", files / "vm", files / "vm" / "root", Path("/r"))
    xml = domain.build(a, "tcg", paths.console_socket, mounts=shares.plan(a, paths),
                       virtiofsd=Path("/bin/virtiofsd"))
    assert [e.get("type") for e in xml.findall("memoryBacking/*")] == ["memfd", None]
    assert xml.find("memoryBacking/access").get("mode") == "shared"
    fs = xml.findall("devices/filesystem")
    assert [(f.find("source").get("dir"), f.find("target").get("dir"),
             f.find("binary").get("path"), f.find("driver").get("type")) for f in fs] == [
        ("/r/shares/share0", "share0", "/bin/virtiofsd", "virtiofs"),
        ("/r/shares/share1", "share1", "/bin/virtiofsd", "virtiofs")]
    assert xml.find("devices/filesystem/readonly") is None  # libvirt 9.0 refuses it
    plain = domain.build(b, "tcg", paths.console_socket, mounts=shares.plan(b, paths))
    assert plain.find("memoryBacking") is None and plain.find("devices/filesystem") is None


def _parts(user_data: bytes) -> list[email.message.Message]:
    message = email.message_from_bytes(user_data, policy=email.policy.compat32)
    assert message.get_content_type() == "multipart/mixed"
    return [part for part in message.walk() if not part.is_multipart()]


@pytest.mark.timeout(10)
def test_seed_user_data_gets_a_cloud_config_part_that_mounts_the_shares(files: Path) -> None:
    stack = load(files, '[vm.a]\nkernel = "vmlinuz"\ncloud_init = { user_data = "user.yaml" }\n'
                        'shares = [{ host = "src", guest = "/src" }, '
                        '{ host = "data", guest = "/my data", readonly = true }]\n'
                        '[vm.b]\nkernel = "vmlinuz"\ncloud_init = { user_data = "user.yaml" }\n')
    a, b = stack.vms
    mine, ours = _parts(seed.contents(stack, a)["user-data"])
    # the user's user-data, unchanged: cloud-init finds its type from its first line
    assert mine.get_content_type() == "text/x-not-multipart"
    assert mine.get_payload(decode=True) == (files / "user.yaml").read_bytes()
    assert ours.get_content_type() == "text/cloud-config"
    assert ours["Merge-Type"] == userdata.APPEND  # appended to the user's bootcmd
    assert ours.get_payload(decode=True).decode().splitlines() == [
        "#cloud-config",
        "# vmrun: mount the shared folders (virtiofs) at every boot",
        "bootcmd:",
        '  - "mkdir -p /src && { mountpoint -q /src || mount -t virtiofs share0 /src; }"',
        "  - \"mkdir -p '/my data' && { mountpoint -q '/my data' || "
        "mount -t virtiofs -o ro share1 '/my data'; }\""]
    # without shares, the user-data is the user's file as it is
    assert seed.contents(stack, b)["user-data"] == (files / "user.yaml").read_bytes()


@pytest.mark.timeout(10)
def test_user_data_that_is_mime_or_gzip_stays_whole(files: Path) -> None:
    vm = load(files, '[vm.a]\nkernel = "vmlinuz"\n'
                     'shares = [{ host = "src", guest = "/src" }]\n').vms[0]
    mime = (b'Content-Type: multipart/mixed; boundary="XX"\nMIME-Version: 1.0\n\n'
            b'--XX\nContent-Type: text/x-shellscript\n\n#!/bin/sh\necho hi\n--XX--\n')
    ours = seed.vmrun_parts(load(files, '[vm.a]\nkernel = "vmlinuz"\n'
                                      'shares = [{ host = "src", guest = "/src" }]\n'), vm, None)
    parts = _parts(userdata.compose(mime, ours))
    assert [p.get_content_type() for p in parts] == ["text/x-shellscript", "text/cloud-config"]
    # (the newline before a MIME boundary belongs to the boundary)
    assert parts[0].get_payload(decode=True) == b"#!/bin/sh\necho hi"
    parts = _parts(userdata.compose(gzip.compress(b"#cloud-config\n{}\n"), ours))
    assert parts[0].get_payload(decode=True) == b"#cloud-config\n{}\n"


# --- the driver's bind mounts ---------------------------------------------------------------

_BIND = """
import os, sys
from vmrun import shares
src, sub, target, ro_target = sys.argv[1:5]
os.system("mount --make-rprivate /")  # nothing propagates back to the host
os.makedirs(sub, exist_ok=True)
os.system(f"mount -t tmpfs tmp {sub}")  # a submount of the shared directory
shares.bind([(src, target, False), (src, ro_target, True)])
for where in (target, ro_target, os.path.join(ro_target, "sub")):
    try:
        with open(os.path.join(where, "new"), "w") as f:
            f.write("x")
        print(where, "written")
    except OSError as exc:
        print(where, exc.strerror)
try:
    shares.bind([(src + "-missing", target + "2", False)])
except OSError as exc:
    print("missing:", exc.strerror)
"""


@pytest.mark.timeout(30)
@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
def test_read_only_bind_mount_refuses_writes_submounts_included(tmp_path: Path) -> None:
    src, target, ro_target = tmp_path / "src", tmp_path / "rw", tmp_path / "ro"
    src.mkdir()
    proc = subprocess.run(
        ["unshare", "--mount", sys.executable, "-c", _BIND, str(src), str(src / "sub"),
         str(target), str(ro_target)],
        capture_output=True, text=True, timeout=30, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"{target} written", f"{ro_target} Read-only file system",
        f"{ro_target}/sub Read-only file system",
        f"missing: mount {src}-missing {target}2: No such file or directory"]
    assert (src / "new").read_text() == "x"  # through the writable bind
    assert not (src / "sub").is_mount() and not target.is_mount()  # nothing left here


# --- real guests ------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_guest_reads_and_writes_shares_and_readonly_refuses(tmp_path: Path,
                                                            guest: Path) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (rw / "in.txt").write_text("hello from the host\n")
    (ro / "in.txt").write_text("read-only data\n")
    extra = ("guest.mount=share0:/rw guest.mount=share1:/ro "
             "guest.cat=/rw/in.txt guest.cat=/ro/in.txt "
             "guest.write=/rw/out.txt:written-by-guest guest.write=/ro/out.txt:nope "
             "guest.write=/ro/in.txt:overwritten")
    path = write_stack(tmp_path, guest, {"a": {
        "cmdline": cmdline(extra=extra), "success": "guest: wrote /rw/out.txt",
        "timeout": 60,
        "shares": [{"host": "rw", "guest": "/rw"},
                   {"host": "./ro", "guest": "/ro", "readonly": True}]}})
    up = Up(path)
    try:
        up.expect("a | guest: mounted share0 on /rw", "a | guest: mounted share1 on /ro",
                  timeout=45)
        up.expect("a | guest: cat /rw/in.txt: hello from the host",
                  "a | guest: cat /ro/in.txt: read-only data", timeout=15)
        up.expect("a | guest: wrote /rw/out.txt",
                  "a | guest: write /ro/out.txt failed: Read-only file system",
                  "a | guest: write /ro/in.txt failed: Read-only file system", timeout=15)
        assert up.wait(30) == 0, up.output + up.stderr
    finally:
        up.kill()
    assert (rw / "out.txt").read_text() == "written-by-guest\n"
    assert sorted(p.name for p in ro.iterdir()) == ["in.txt"]
    assert (ro / "in.txt").read_text() == "read-only data\n"
    assert last_run(path)["vms"]["a"]["outcome"] == "ok"
    # nothing of the bind mounts is visible outside the driver
    with open("/proc/self/mountinfo") as mountinfo:
        assert str(tmp_path) not in mountinfo.read()


@pytest.mark.timeout(90)
def test_a_host_directory_removed_before_the_start_is_a_start_error(tmp_path: Path,
                                                                   guest: Path) -> None:
    """The directory exists when the manifest is read, and is gone when b's driver binds
    it (b waits for a): b does not start, and says why."""
    (tmp_path / "src").mkdir()
    path = write_stack(tmp_path, guest, {
        "a": {"cmdline": cmdline(say="a-is-up", sleep=2)},
        "b": {"cmdline": cmdline(), "depends_on": {"a": "ok"},
              "shares": [{"host": "src", "guest": "/src"}]}})
    up = Up(path)
    try:
        up.expect("a | a-is-up", timeout=45)
        (tmp_path / "src").rmdir()
        assert up.wait(45) == 1, up.output + up.stderr
    finally:
        up.kill()
    result = last_run(path)["vms"]["b"]
    assert result["outcome"] == "failed", result
    assert result["reason"].startswith("start error: shared folder"), result
    assert str(tmp_path / "src") in result["reason"], result
