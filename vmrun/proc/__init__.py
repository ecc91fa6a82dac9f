"""Entry points of vmrun's child processes: each module here is a `python -m` program.

    vmrun.proc.zygote    imports the driver and libvirt once and forks each driver
    vmrun.proc.driver    one per VM (and the one-off capabilities probe): owns the VM's
                         embedded libvirt root; imports libvirt, never lxml or the manifest;
                         forked by the zygote (`python -m` runs it by hand)
    vmrun.proc.forward   the port forwarder, when a stack forwards host ports

Each driver and the forwarder take a spec (vmrun.protocol) and talk to the supervisor in
vmrun.protocol's messages only.  The supervisor side lives outside this package.
"""
