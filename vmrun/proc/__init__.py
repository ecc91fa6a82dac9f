"""Entry points of vmrun's child processes: each module here is a `python -m` program.

    vmrun.proc.driver    one per VM (and the one-off capabilities probe): owns the VM's
                         embedded libvirt root; imports libvirt, never lxml or the manifest
    vmrun.proc.forward   the port forwarder, when a stack forwards host ports

Each takes its spec (vmrun.protocol) as its one argument and talks to the supervisor in
vmrun.protocol's messages only.  The supervisor side lives outside this package.
"""
