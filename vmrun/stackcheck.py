"""The checks across VMs: names given twice, networks and their addresses, forwarded
ports, depends_on (names resolved, cycles refused) and cmdline placeholders.

Each check takes the VMs parsed so far, reports into the Collector, and skips what an
earlier problem already made uncertain (a VM's keys without a valid value are in `bad`),
so a VM with a bad value still takes part in the checks that do not depend on that value.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vmrun.collect import Collector
from vmrun.convert import Invalid, describe, did_you_mean
from vmrun.limits import MAX_NETWORKS, NAME_RE, NETWORK_NAME_MAX

if TYPE_CHECKING:  # vmrun.manifest imports this module
    from vmrun import network
    from vmrun.manifest import VM

# vmrun.network (with hashlib and its dataclasses) is imported by the checks below when a
# stack has networks: `vmrun check` of a stack without any starts sooner.


_PLACEHOLDER_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


class UnknownPlaceholder(Invalid):
    def __init__(self, expected: str, placeholder: str) -> None:
        super().__init__(expected)
        self.placeholder = placeholder


def fill_placeholders(text: str, values: Mapping[str, str]) -> str:
    """Replace {vm.name}-style placeholders; {{ and }} are literal braces."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) in ("{{", "}}"):
            return match.group(0)[0]
        key = match.group(1)
        if key not in values:
            own = [k for k in values if not (k.startswith("vm.") and k.count(".") > 1)]
            raise UnknownPlaceholder(
                "known placeholders only: " + ", ".join(f"{{{k}}}" for k in own)
                + (", {vm.OTHER.net.NAME.ip}" if len(own) < len(values) else "")
                + f" (found {{{key}}}; write {{{{ and }}}} for literal braces)", key)
        return values[key]

    return _PLACEHOLDER_RE.sub(replace, text)


def fill_known_placeholders(text: str, values: Mapping[str, str]) -> str:
    """Replace the placeholders of `values` only; any other brace is left as it is (for
    cloud-init user-data, where braces are YAML, JSON or Jinja of their own)."""
    return re.sub(r"\{([A-Za-z0-9_.-]+)\}",
                  lambda match: values.get(match.group(1), match.group(0)), text)


def other_vms_values(vms: list[VM] | tuple[VM, ...]) -> dict[str, str]:
    """{vm.OTHER.net.NAME.ip} etc.: every VM's addresses, for the others' placeholders."""
    others: dict[str, str] = {}
    for vm in vms:
        for address in vm.addresses:
            prefix = f"vm.{vm.name}.net.{address.network}."
            others[prefix + "ip"] = str(address.ip)
            others[prefix + "cidr"] = address.cidr
            others[prefix + "mac"] = address.mac
    return others


def check_duplicates(col: Collector, vms: list[VM]) -> None:
    seen: dict[str, str] = {}
    for vm in list(vms):
        if vm.name in seen:
            col.add(("vm", vm.group), f'two VMs are named "{vm.name}"',
                    found=f"[vm.{seen[vm.name]}] and [vm.{vm.group}]",
                    hint="rename one table (copies of a table with count are named NAME-N)")
            vms.remove(vm)
        seen.setdefault(vm.name, vm.group)


def parse_networks(col: Collector, tables: Any) -> tuple[dict[str, network.Network], set[str]]:
    """The networks, and the names of every [network.NAME] table, valid or not."""
    if not isinstance(tables, dict):
        col.add(("network",), "invalid value", expected="tables [network.NAME]",
                found=describe(tables))
        return {}, set()
    if not tables:  # as below, without importing vmrun.network
        return {}, set()
    from vmrun import network

    subnets: dict[str, Any] = {}
    for number, (name, table) in enumerate(tables.items()):
        where = ("network", name)
        if number >= MAX_NETWORKS:
            col.add(where, f"more than {MAX_NETWORKS} networks",
                    expected=f"at most {MAX_NETWORKS} networks in a stack")
            break
        if not NAME_RE.match(name) or len(name) > NETWORK_NAME_MAX:
            col.add(where, "invalid network name",
                    expected=f"lower-case letters, digits and '-', starting with a letter, "
                             f"at most {NETWORK_NAME_MAX} characters", found=f'"{name}"')
            continue
        if not isinstance(table, dict):
            col.add(where, "invalid value", expected="a table", found=describe(table))
            continue
        if where in col.broken:  # ${VAR} failed
            continue
        for key in (k for k in table if k != "subnet"):
            col.add((*where, key), "unknown key", hint=did_you_mean(key, ["subnet"]))
        subnets[name] = None
        if "subnet" in table:
            value = table["subnet"]
            try:
                if not isinstance(value, str):
                    raise ValueError("an IPv4 subnet like 10.77.0.0/24, as a string")
                subnet = network.parse_subnet(value)
            except ValueError as exc:
                col.add((*where, "subnet"), "invalid value", expected=str(exc),
                        found=describe(value))
                continue
            clash = [n for n, other in subnets.items() if other and other.overlaps(subnet)]
            if clash:
                col.add((*where, "subnet"), f"overlaps the subnet of network {clash[0]}")
                continue
            subnets[name] = subnet
    wanted = [name for name, subnet in subnets.items() if subnet is None]
    free = network.default_subnets(len(wanted), {v for v in subnets.values() if v})
    if len(free) < len(wanted):
        col.add(("network", wanted[len(free)]), "no free default subnet",
                expected=f"a free /24 in {network.DEFAULT_SUBNET_BASE}",
                hint='give this network a subnet = "..." of its own')
        return {}, set(tables)
    defaults = dict(zip(wanted, free, strict=True))
    return ({name: network.Network(name, subnet or defaults[name])
             for name, subnet in subnets.items()}, set(tables))


def attach_networks(col: Collector, vms: list[VM], networks: dict[str, network.Network],
                    declared: set[str], stack_name: str, bad: dict[str, set[str]]) -> list[VM]:
    """Check each VM's networks and forwards, and give it its addresses.  A VM whose
    `networks` or `forward` is invalid (already reported) is checked as far as it can be."""
    members: dict[str, list[str]] = {}
    ports: dict[tuple[str, int], str] = {}
    reported: set[str] = set()
    unknown: set[tuple[str, str]] = set()  # (network, table) reported, once for all copies
    for vm in vms:
        where = ("vm", vm.group, "networks")
        nets_ok = "networks" not in bad[vm.name]
        for name in vm.networks if nets_ok else ():
            if name not in declared:
                if (name, vm.group) not in unknown and not col.full:
                    col.add(where, f'unknown network "{name}"',
                            expected="the name of a [network.NAME] table",
                            hint=did_you_mean(name, list(declared)) or
                            f"declare it: [network.{name}]")
                unknown.add((name, vm.group))
            elif name in networks:
                members.setdefault(name, []).append(vm.name)
        for forward in vm.forward if nets_ok and "forward" not in bad[vm.name] else ():
            key = (forward.host_address, forward.host_port)
            if not vm.networks:
                if ("", vm.group) not in unknown:  # once for the table
                    col.add(("vm", vm.group, "forward"), "a forward needs a network",
                            hint='attach the VM to a network: networks = ["lan"] and a '
                                 "[network.lan] table")
                unknown.add(("", vm.group))
            elif key in ports and ports[key] not in reported:
                reported.add(ports[key])
                copies = vm.group != vm.name and ports[key].startswith(vm.group + "-")
                col.add(("vm", vm.group, "forward"),
                        f"host port {forward.host_address}:{forward.host_port} is already "
                        f"forwarded to {ports[key]}",
                        hint="copies (count) cannot share a host port: forward from a VM "
                             "without count" if copies else None)
            ports.setdefault(key, vm.name)
    addresses: dict[tuple[str, str], network.Address] = {}
    try:
        if members:  # else no VM has a network
            from vmrun import network

            addresses = network.assign(stack_name, networks, members)
    except ValueError as exc:
        col.add(("network",), str(exc), hint="use a larger subnet")
        networks.clear()  # no addresses: placeholders that need them are not checked
        return vms
    return [dataclasses.replace(vm, addresses=tuple(
        addresses[(vm.name, n)] for n in vm.networks if (vm.name, n) in addresses))
        for vm in vms]


def check_ready(col: Collector, vms: list[VM], vm_tables: dict[str, Any],
                bad: dict[str, set[str]]) -> None:
    """`ready = { port = … }` and `{ ssh = … }` reach the VM at its first private address
    (from inside the stack's network namespace): such a VM needs a private network."""
    reported: set[str] = set()  # [vm.NAME] tables: once for the copies of one (`count`)
    for vm in vms:
        ready = vm.ready
        if ready is None or not ready.probed or vm.networks or vm.group in reported or \
                {"ready", "networks"} & bad[vm.name]:
            continue
        reported.add(vm.group)
        table = vm_tables.get(vm.group)
        where: tuple[str, ...] = ("vm", vm.group, "ready")
        if not isinstance(table, dict) or "ready" not in table:
            where = ("defaults", "ready")
        col.add(where, f"ready = {{ {ready.form} = … }} needs a private network",
                found=f"[vm.{vm.group}] without networks",
                hint='attach the VM to a network (networks = ["lan"] and a [network.lan] '
                     "table): the check connects to its first private address; a NAT NIC "
                     "takes no connections in")


def placeholder_values(vm: VM, stack_name: str,
                       networks: dict[str, network.Network] | None = None) -> dict[str, str]:
    values = {"vm.name": vm.name, "vm.index": str(vm.index), "index": str(vm.index),
              "stack.name": stack_name}
    for address in vm.addresses:
        prefix = f"net.{address.network}."
        values[prefix + "ip"] = str(address.ip)
        values[prefix + "prefix"] = str(address.prefix)
        values[prefix + "cidr"] = address.cidr
        values[prefix + "mac"] = address.mac
        if networks and address.network in networks:
            values[prefix + "gateway"] = str(networks[address.network].gateway)
    if vm.nat:
        from vmrun import nat  # with subprocess and more: only for a VM with NAT

        values |= nat.placeholder_values(stack_name, vm.name)
    return values


def fill_cmdlines(col: Collector, vms: list[VM], stack_name: str,
                  networks: dict[str, network.Network], bad: dict[str, set[str]],
                  others_unsure: bool) -> None:
    """Fill in each cmdline's placeholders.  An unknown placeholder that might be known
    once other problems are fixed ({net.NAME.ip} of an invalid network, say) is not
    reported."""
    reported: set[str] = set()
    others = other_vms_values(vms)
    for i, vm in enumerate(vms):
        if "cmdline" in bad[vm.name]:
            continue
        try:
            cmdline = fill_placeholders(vm.cmdline,
                                        placeholder_values(vm, stack_name, networks) | others)
        except UnknownPlaceholder as exc:
            key = exc.placeholder
            unsure = (key.startswith("vm.") and others_unsure) or (
                key.startswith("net.") and ("networks" in bad[vm.name] or any(
                    key.startswith(f"net.{n}.") for n in vm.networks if n not in networks)))
            if vm.group not in reported and not unsure:
                col.add(("vm", vm.group, "cmdline"), "invalid placeholder",
                        expected=exc.expected)
                reported.add(vm.group)
            continue
        vms[i] = dataclasses.replace(vm, cmdline=cmdline)


def resolve_dependencies(col: Collector, vms: list[VM], vm_tables: dict[str, Any],
                         bad: dict[str, set[str]], unsure: set[str]) -> None:
    """Turn depends_on names (tables or copies) into VM names; reject unknowns and cycles.

    A name that may be one of the `unsure` tables' VMs (a table with an invalid name or
    count, already reported) is not called unknown.
    """
    groups: dict[str, list[str]] = {}
    for vm in vms:
        groups.setdefault(vm.group, []).append(vm.name)
    names = {vm.name for vm in vms}
    resolved: dict[str, tuple[tuple[str, str], ...]] = {}
    reported: set[tuple[tuple[str, ...], str]] = set()
    for i, vm in enumerate(vms):
        if "depends_on" in bad[vm.name]:
            continue
        where: tuple[str, ...] = ("vm", vm.group, "depends_on")
        if "depends_on" not in vm_tables[vm.group]:
            where = ("defaults", "depends_on")
        deps: list[tuple[str, str]] = []
        for target, condition in dict.fromkeys(vm.depends_on):
            if target in groups:
                members = groups[target]
            elif target in names:
                members = [target]
            else:
                group, _, index = target.rpartition("-")
                maybe = target in unsure or (group in unsure and index.isdigit())
                if (where, target) not in reported and not maybe and not col.full:
                    col.add(where, f'unknown VM "{target}"', expected="the name of a "
                            "[vm.NAME] table or of one of its copies",
                            hint=did_you_mean(target, [*groups, *names]))
                reported.add((where, target))
                continue
            deps += [(m, condition) for m in members]
        deps = list(dict.fromkeys(deps))
        if any(m == vm.name for m, _ in deps):
            col.add(where, f'VM "{vm.name}" depends on itself')
            deps = [d for d in deps if d[0] != vm.name]
        resolved[vm.name] = tuple(deps)
        vms[i] = dataclasses.replace(vm, depends_on=tuple(deps))
    cycle = _find_cycle({name: [d for d, _ in deps] for name, deps in resolved.items()})
    if cycle:
        first = next(vm for vm in vms if vm.name == cycle[0])
        col.add(("vm", first.group, "depends_on"), "dependency cycle: " + " -> ".join(cycle),
                hint="remove one of these depends_on entries")


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """A cycle of `graph` as [a, b, ..., a], found depth first (without recursion)."""
    done: set[str] = set()
    for start in graph:
        if start in done:
            continue
        path: list[str] = [start]
        on_path = {start}
        todo = [iter(graph.get(start, []))]
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                node = path.pop()
                on_path.discard(node)
                done.add(node)
                todo.pop()
                continue
            if nxt in on_path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                todo.append(iter(graph.get(nxt, [])))
    return None
