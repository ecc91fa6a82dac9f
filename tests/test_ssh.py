"""Logging in and running commands: `vmrun ssh`, `exec`, `cp`, `ssh --config`.

Unit tests (no guest) for the console parser (host keys, login user), the user-data with
the stack's key, the ssh options and the config printer; then one real Debian guest on a
private network, shared by the module's tests (none stops it: they may run in any
order): every connection goes through `vmrun _proxy` inside the stack's network
namespace, so the guest talks to nothing but the host side of its own namespace.
"""

from __future__ import annotations

import email
import email.policy
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import cmdline, load_text, vmrun, write_stack
from vmrun import access, seed, userdata
from vmrun.layout import StackPaths

ED25519 = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICaviQgqE9FbmqSZRM6EvaV96n5fH4ImL+Lzfnf1idSt")
ECDSA = ("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBAeETpdT/y"
         "fN0cPsk+VjQkf3DW5d6xEJpFxf4Y8m/DWL4grrhf1U/WsTze0O9PsDYzAaCaL7tNCv+djkyVd4RRA=")

# As a Debian 12 guest's console shows them (cloud-init 22.4), between other lines.
CONSOLE = f"""\
ci-info: ++++++++Authorized keys from /home/debian/.ssh/authorized_keys for user debian++++++++
ci-info: +-------------+----------------------------------------+---------+---------+
ci-info: |   Keytype   |          Fingerprint (sha256)          | Options | Comment |
ci-info: +-------------+----------------------------------------+---------+---------+
ci-info: | ssh-ed25519 | 4a:f6:d0:05:6c:1b:7d:31:55:68:d2:67:a9 |    -    |  second |
ci-info: | ssh-ed25519 | 11:83:6b:a8:b7:bb:ce:8f:58:8f:c1:71:62 |    -    | vmrun-t |
ci-info: +-------------+----------------------------------------+---------+---------+
<14>Nov 26 18:04:59 cloud-init: -----END SSH HOST KEY FINGERPRINTS-----
-----BEGIN SSH HOST KEY KEYS-----
{ECDSA} root@web
[   98.17] random: crng init done
ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICaviQgqE9Fbmq*SZRM6EvaV96n5fH4ImL+Lzfnf1idSt root@web
ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAICaviQgqE9FbmqSZRM6EvaV96n5fH4ImL+Lzfnf1idSt root@web
{ED25519} root@web
-----END SSH HOST KEY KEYS-----
[   98.173415] cloud-init[348]: Cloud-init v. 22.4.2 finished
"""


def feed(parser: access.ConsoleParser, text: str) -> list[access.Found]:
    return [found for line in text.splitlines() if (found := parser.feed(line + "\r"))]


def test_console_parser_finds_the_login_and_the_host_keys() -> None:
    found = feed(access.ConsoleParser("vmrun-t"), CONSOLE)
    # the ed25519 line with a broken blob and the "ssh-rsa" line whose blob is an ed25519
    # key are not well-formed: dropped, as is the kernel's line in the block
    assert found == [access.Found(login="debian"), access.Found(host_keys=[ECDSA, ED25519])]


def test_console_parser_ignores_incomplete_blocks_and_other_tables() -> None:
    parser = access.ConsoleParser("vmrun-t")
    assert feed(parser, f"{ED25519} outside a block\n-----END SSH HOST KEY KEYS-----\n") == []
    text = "-----BEGIN SSH HOST KEY KEYS-----\n" + "noise\n" * 70 + f"{ED25519}\n" + \
        "-----END SSH HOST KEY KEYS-----\n"
    assert feed(parser, text) == []  # too long without its END: dropped
    assert feed(parser, "-----BEGIN SSH HOST KEY KEYS-----\n-----END SSH HOST KEY KEYS-----") == []
    other = ("ci-info: ++++++Net device info++++++\n"
             "ci-info: | eth0 | True | 10.0.2.15 | vmrun-t |\n"
             "ci-info: ++++Authorized keys from /root/.ssh/authorized_keys for user bob++++\n"
             "ci-info: | ssh-ed25519 | 11:83 | - | vmrun-other |\n"
             "ci-info: +-------------+-------+---+-------------+\n"
             "ci-info: no authorized SSH keys fingerprints found for user ann.\n"
             "ci-info: | ssh-ed25519 | 11:83 | - | vmrun-t |\n")
    assert feed(parser, other) == []


def test_console_watch_writes_known_hosts_and_the_login(tmp_path: Path) -> None:
    class Stack:
        name = "t"
        vms = [type("VM", (), {"name": "web"})(), type("VM", (), {"name": "db"})()]
        paths = StackPaths(tmp_path)

    paths = StackPaths(tmp_path)
    paths.ssh_dir.mkdir()
    paths.known_hosts.write_text("db.t ssh-ed25519 AAAA\nweb.t ssh-ed25519 OLD\n")
    paths.ssh_hosts.write_text(json.dumps({"stack": "t", "netns": None, "vms": {
        "web": {"address": "10.77.0.9", "ssh_user": None, "login": None}}}))
    watch = access.ConsoleWatch(Stack())  # type: ignore[arg-type]
    for line in CONSOLE.splitlines():
        watch.line("web", line)
    assert paths.known_hosts.read_text().splitlines() == [
        "db.t ssh-ed25519 AAAA", f"web.t {ECDSA}", f"web.t {ED25519}"]
    assert json.loads(paths.ssh_hosts.read_text())["vms"]["web"]["login"] == "debian"
    assert oct(paths.known_hosts.stat().st_mode & 0o777) == "0o600"


def test_user_data_gets_the_key_and_keeps_the_users_part(tmp_path: Path) -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEih3ual4vG/4i7OQ0AuUBXmbuGx4jXi vmrun-t"
    user = b"#cloud-config\nssh_authorized_keys: [ssh-ed25519 AAAA second]\n"
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    stack = load_text(tmp_path, '[vm.web]\nkernel = "vmlinuz"\n')
    key_part = seed.vmrun_parts(stack, stack.vms[0], key)  # the key's part alone
    assert [part.filename for part in key_part] == ["vmrun-ssh-key.cfg"]
    message = email.message_from_bytes(userdata.compose(user, key_part),
                                       policy=email.policy.compat32)
    parts = [part for part in message.walk() if not part.is_multipart()]
    assert [p.get_content_type() for p in parts] == ["text/x-not-multipart",
                                                     "text/cloud-config"]
    assert parts[0].get_payload(decode=True) == user
    ours = parts[1].get_payload(decode=True).decode()
    assert ours.startswith("#cloud-config\n") and json.dumps(key) in ours
    assert parts[1]["Merge-Type"] == userdata.APPEND  # appended to the user's keys
    # a MIME multipart already (shared folders' part, make-mime): one more part
    twice = email.message_from_bytes(userdata.compose(message.as_bytes(), key_part),
                                     policy=email.policy.compat32)
    assert len([p for p in twice.walk() if not p.is_multipart()]) == 3
    # nothing of the user's: our part alone
    alone = email.message_from_bytes(userdata.compose(b"", key_part),
                                     policy=email.policy.compat32)
    assert [p.get_content_type() for p in alone.walk() if not p.is_multipart()] == [
        "text/cloud-config"]


def target(tmp_path: Path) -> access.Target:
    return access.Target(alias="web.t", address="10.77.0.9", user="debian",
                         netns="vmrun-0123456789ab", paths=StackPaths(tmp_path / "a b%c" / "t"))


def test_config_printer(tmp_path: Path) -> None:
    text = access.config([target(tmp_path)], ["db: no private network (vmrun ssh cannot "
                                              "reach it)"])
    lines = text.splitlines()
    assert lines[0] == "Host web.t"
    options = dict(line.strip().split(" ", 1) for line in lines[1:] if line.startswith("    "))
    state = f"{tmp_path}/a b%%c/t/ssh"
    assert options["HostName"] == "10.77.0.9" and options["User"] == "debian"
    assert options["IdentityFile"] == f'"{state}/id_ed25519"'
    assert options["UserKnownHostsFile"] == f'"{state}/known_hosts"'
    assert options["HostKeyAlias"] == "web.t"
    assert options["StrictHostKeyChecking"] == "yes"
    assert options["ProxyCommand"].endswith(" _proxy vmrun-0123456789ab %h %p")
    assert os.path.isabs(options["ProxyCommand"].split()[0])
    assert lines[-1] == "# db: no private network (vmrun ssh cannot reach it)"
    # ssh itself reads it so: the values it would use for web.t
    config = tmp_path / "config"
    config.write_text(text)
    proc = subprocess.run(["ssh", "-G", "-F", str(config), "web.t"], capture_output=True,
                          text=True, timeout=10)
    assert proc.returncode == 0, proc.stderr
    seen = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert seen["hostname"] == "10.77.0.9" and seen["hostkeyalias"] == "web.t"
    # (-G shows IdentityFile before its %-tokens are expanded: "%%" is a literal "%")
    assert seen["identityfile"] == f"{tmp_path}/a b%%c/t/ssh/id_ed25519"
    assert seen["userknownhostsfile"] == f"{tmp_path}/a b%c/t/ssh/known_hosts"


def test_ssh_and_scp_argv(tmp_path: Path) -> None:
    tgt = target(tmp_path)
    argv = access.ssh_argv(tgt, ["echo", "-n", "x"], tty=False, batch=True)
    assert argv[-5:] == ["--", "web.t", "echo", "-n", "x"] and "-T" in argv
    assert "-t" in access.ssh_argv(tgt, ["top"], tty=True, batch=False)
    assert "-t" not in access.ssh_argv(tgt, [], tty=True, batch=False)
    scp = access.scp_argv(tgt, (None, "a:b"), ("web", "/tmp/x"), recursive=True)
    assert scp[-4:] == ["-r", "--", "./a:b", "web.t:/tmp/x"]
    assert access.parse_cp_arg("web:/tmp/x", ["web"]) == ("web", "/tmp/x")
    assert access.parse_cp_arg("db:/tmp/x", ["web"]) == (None, "db:/tmp/x")
    assert access.parse_cp_arg("./web:x", ["web"]) == (None, "./web:x")


def test_usage_errors_are_exit_2(tmp_path: Path) -> None:
    manifest = tmp_path / "s.toml"
    manifest.write_text('[vm.web]\nkernel = "k"\n')
    for args in (["ssh", str(manifest), "nope"], ["exec", str(manifest), "nope", "--", "true"],
                 ["exec", str(manifest), "web"], ["cp", str(manifest), "nope:/x", "y"],
                 ["cp", str(manifest), "a", "b"], ["ssh", "--config", str(manifest), "nope"]):
        proc = vmrun(*args, timeout=30)
        assert proc.returncode == 2, (args, proc.stderr)
    proc = vmrun("exec", str(manifest), "web", "--", "true", timeout=30)
    assert proc.returncode == 255 and "was never started" in proc.stderr
    proc = vmrun("_proxy", "not-ours", "10.0.0.1", "22", timeout=30)
    assert proc.returncode == 2 and "not a vmrun network namespace" in proc.stderr


# --- a real guest ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(guest: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A Debian guest on a private network, its user-data authorizing a second key of the
    test's own, ready when cloud-init has finished (`ready = { ssh = … }`); up until the
    module's tests are done."""
    image = guest / "debian.qcow2"
    if not image.is_file():
        pytest.fail(f"{image} is missing: run `make guest` (make test does)")
    directory = tmp_path_factory.mktemp("ssh")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "second", "-f",
                    str(directory / "second")], check=True, timeout=30)
    public = (directory / "second.pub").read_text().strip()
    (directory / "user.yaml").write_text(f"#cloud-config\nssh_authorized_keys:\n  - {public}\n")
    manifest = write_stack(directory, guest, {"web": {
        "boot": "bios", "disks": [{"image": str(image)}], "memory": "768M", "cpus": 2,
        "networks": ["lan"], "nat": True, "cloud_init": {"user_data": "user.yaml"},
        "timeout": 600,
        "ready": {"ssh": "test -e /var/lib/cloud/instance/boot-finished"},
        "ready_timeout": 400}},
        network={"lan": {}})
    proc = vmrun("up", "--detach", "--wait", str(manifest), timeout=420)
    try:
        assert proc.returncode == 0, proc.stderr
        yield manifest
    finally:
        down = vmrun("down", str(manifest), timeout=120)
        assert down.returncode == 0, down.stderr


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmrun", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(480)
def test_exec_separates_the_streams_and_passes_the_status(stack: Path) -> None:
    proc = run("exec", str(stack), "web", "--", "echo out; echo err >&2; exit 7")
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, "out\n", "err\n")
    paths = StackPaths(stack.parent / ".vmrun" / "t")
    assert oct(paths.ssh_key.stat().st_mode & 0o777) == "0o600"
    assert {line.split()[1] for line in paths.known_hosts.read_text().splitlines()} == {
        "ssh-ed25519", "ecdsa-sha2-nistp256"}
    # no ssh_user: the user cloud-init gave the key, as the console showed it
    assert json.loads(paths.ssh_hosts.read_text())["vms"]["web"]["login"] == "debian"


@pytest.mark.timeout(60)
def test_ssh_runs_a_command(stack: Path) -> None:
    assert run("ssh", str(stack), "web", "--", "true").returncode == 0
    proc = run("ssh", str(stack), "web", "--", "id", "-un", ";", "exit", "3")
    assert (proc.returncode, proc.stdout) == (3, "debian\n"), proc.stderr


@pytest.mark.timeout(60)
def test_cp_into_the_guest_and_back(stack: Path, tmp_path: Path) -> None:
    sent = tmp_path / "sent.bin"
    sent.write_bytes(os.urandom(200_000))
    proc = run("cp", str(stack), str(sent), "web:/tmp/copy.bin")
    assert proc.returncode == 0, proc.stderr
    back = tmp_path / "back.bin"
    proc = run("cp", str(stack), "web:/tmp/copy.bin", str(back))
    assert proc.returncode == 0, proc.stderr
    assert back.read_bytes() == sent.read_bytes()
    proc = run("cp", str(stack), "web:/nonexistent", str(tmp_path / "x"))
    assert proc.returncode != 0 and not (tmp_path / "x").exists()


@pytest.mark.timeout(60)
def test_plain_ssh_with_the_printed_config(stack: Path, tmp_path: Path) -> None:
    proc = run("ssh", "--config", str(stack))
    assert proc.returncode == 0, proc.stderr
    config = tmp_path / "config"
    config.write_text(proc.stdout)
    plain = subprocess.run(["ssh", "-F", str(config), "web.t", "hostname"], capture_output=True,
                           text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert (plain.returncode, plain.stdout) == (0, "web\n"), plain.stderr
    # the user's own key (in their user-data) works too, alone
    second = stack.parent / "second"
    other = tmp_path / "config-second"
    other.write_text("\n".join(f"    IdentityFile {second}" if "IdentityFile" in line else line
                               for line in proc.stdout.splitlines()) + "\n")
    plain = subprocess.run(["ssh", "-F", str(other), "web.t", "whoami"], capture_output=True,
                           text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert (plain.returncode, plain.stdout) == (0, "debian\n"), plain.stderr


@pytest.mark.timeout(120)
def test_the_guest_names_its_stack_and_fetches_a_page_over_nat(stack: Path,
                                                              tmp_path: Path) -> None:
    """/etc/hosts has the stack's VMs (the boothook vmrun adds); with nat, a page of an
    HTTP server on the host's loopback comes through the NAT gateway."""
    proc = run("exec", str(stack), "web", "--", "getent hosts web.lan")
    assert proc.returncode == 0 and proc.stdout.split()[1:] == ["web", "web.lan"], proc
    (tmp_path / "page.html").write_text("served by the host\n")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler,
                                            directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        proc = run("exec", str(stack), "web", "--",
                   f"curl -sS --max-time 20 http://10.0.2.2:{port}/page.html")
    finally:
        server.shutdown()
        server.server_close()
    assert (proc.returncode, proc.stdout) == (0, "served by the host\n"), proc.stderr


@pytest.mark.timeout(60)
def test_unknown_vm_is_exit_2(stack: Path) -> None:
    for args in (["ssh", str(stack), "nope", "--", "true"], ["exec", str(stack), "nope", "--",
                                                             "true"]):
        proc = run(*args)
        assert proc.returncode == 2 and 'no VM named "nope"' in proc.stderr


@pytest.mark.timeout(120)
def test_stopped_stack_is_exit_255(guest: Path, tmp_path: Path) -> None:
    """`exec` in a stack that ran and was stopped: exit 255, "is not running".  The stack is
    the test's own, of the small test guest on a private network like the module's: what
    `exec` reads of a stopped stack (its hosts.json and key, its lock) does not depend on
    the guest, and the module's Debian guest stays up for the other tests, whichever runs
    first."""
    manifest = write_stack(tmp_path, guest, {"web": {
        "cmdline": cmdline(action="hang"), "networks": ["lan"]}}, network={"lan": {}})
    try:
        up = vmrun("up", "--detach", "--wait", str(manifest), timeout=90)
        assert up.returncode == 0, up.stderr
    finally:
        down = vmrun("down", "--timeout", "0", str(manifest), timeout=60)
    assert down.returncode == 0, down.stderr
    proc = run("exec", str(manifest), "web", "--", "true")
    assert proc.returncode == 255 and 'stack "t" is not running' in proc.stderr, proc.stderr
