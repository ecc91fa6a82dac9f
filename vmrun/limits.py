"""The manifest's bounds and fixed choices: name rules, sizes, counts, enumerations.

The converters (vmrun/convert.py, vmrun/fileconvert.py) enforce them, the settings table
(vmrun/settings.py) and the JSON Schema (vmrun/schema.py) state them, and the checks
across VMs (vmrun/stackcheck.py) apply the ones that concern a whole stack.
"""

from __future__ import annotations

import re

NAME_RE = re.compile(r"[a-z][a-z0-9-]*\Z")
VM_NAME_MAX = 20
STACK_NAME_MAX = 40
NETWORK_NAME_MAX = 12  # bridge names (vr-NAME) must fit in 15 characters
ACCELS = ("auto", "kvm", "tcg")

MIN_MEMORY_MIB = 16
MAX_CPUS = 64
MAX_SECONDS = 7 * 24 * 3600
MAX_COUNT = 64
MAX_DISKS = 16
MAX_SHARES = 16  # shared folders of a VM (tags share0 ... share15)
MAX_VMS = 1024  # in a stack, copies (count) included
MAX_NETWORKS = 256  # in a stack: the /24s of the default 10.77.0.0/16

DEPENDENCY_CONDITIONS = ("ready", "ok")

DISK_FORMATS = ("raw", "qcow2")
DISK_MEDIA = ("disk", "cdrom")
BOOT_MODES = ("kernel", "bios", "uefi")
ON_REBOOT = ("restart", "stop")
RESTART_POLICIES = ("no", "on-failure", "always")
MAX_RESTARTS = 100
CHECKSUMS = {"sha256": 64, "sha512": 128}  # algorithm: hex digits
URL_SCHEMES = ("https", "http", "file")
MIN_DISK_MIB = 1
MAX_DISK_MIB = 64 * 1024 * 1024
