"""Names between VMs (/etc/hosts by a boothook) and placeholders in cloud-init user-data,
without a guest."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

from conftest import load_text
from vmrun import manifest, names, seed


def load(directory: Path, text: str) -> manifest.Stack:
    """`load_text`, with the `vmlinuz` the manifests here name written first."""
    (directory / "vmlinuz").write_bytes(b"kernel")
    return load_text(directory, text)


STACK = """
[network.lan]
[network.back]
[vm.web]
kernel = "vmlinuz"
networks = ["lan"]
cloud_init = { user_data = "web.yaml" }
[vm.db]
kernel = "vmlinuz"
networks = ["back", "lan"]
nat = true
cloud_init = { user_data = "db.yaml" }
[vm.cache]
kernel = "vmlinuz"
networks = ["back"]
"""


def test_user_data_placeholders_are_filled_and_other_braces_kept(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(
        "#cloud-config\n# {vm.name} #{index} of {stack.name}: me {net.lan.ip}, "
        "db {vm.db.net.lan.ip}\nbootcmd: [\"echo {{ ds.meta_data }} {unknown} {}\"]\n")
    (tmp_path / "db.yaml").write_bytes(b"#cloud-config\n# nat {nat.ip} \xff\n")
    stack = load(tmp_path, STACK)
    web, db = stack.vm("web"), stack.vm("db")
    text = seed.user_data(stack, web).decode()
    assert (f"# web #1 of s: me {web.addresses[0].ip}, db {db.addresses[1].ip}\n"
            in text)
    assert '"echo {{ ds.meta_data }} {unknown} {}"' in text
    # not UTF-8: given as it is
    assert seed.user_data(stack, db) == b"#cloud-config\n# nat {nat.ip} \xff\n"
    # in the seed: the user's part, then vmrun's (the names of the VMs on its networks)
    message = email.message_from_bytes(seed.contents(stack, web)["user-data"],
                                       policy=email.policy.compat32)
    parts = [part for part in message.walk() if not part.is_multipart()]
    assert [part.get_content_type() for part in parts] == [
        "text/x-not-multipart", "text/cloud-boothook"]
    assert parts[0].get_payload(decode=True).decode() == text
    assert parts[1].get_payload(decode=True) == names.hosts_boothook(stack, web)


def test_hosts_entries_cover_the_shared_networks(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text("#cloud-config\n")
    (tmp_path / "db.yaml").write_text("#cloud-config\n")
    stack = load(tmp_path, STACK)
    ip = {(vm.name, a.network): str(a.ip) for vm in stack.vms for a in vm.addresses}
    assert names.hosts_entries(stack, stack.vm("web")) == [
        (ip["web", "lan"], ["web", "web.lan"]), (ip["db", "lan"], ["db", "db.lan"])]
    assert names.hosts_entries(stack, stack.vm("db")) == [
        (ip["db", "back"], ["db", "db.back"]), (ip["cache", "back"], ["cache", "cache.back"]),
        (ip["web", "lan"], ["web", "web.lan"]), (ip["db", "lan"], ["db.lan"])]
    hook = names.hosts_boothook(stack, stack.vm("web"))
    assert hook is not None and hook.startswith(b"#cloud-boothook\n#!/bin/sh\n")
    assert f"{ip['db', 'lan']} db db.lan # vmrun\n".encode() in hook
    assert b"sed -i '/ # vmrun$/d' /etc/hosts" in hook
