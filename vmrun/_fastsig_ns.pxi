# Included by _fastsig.pyx: the stack's PID namespace.
#
# Why: libvirt daemonizes QEMU, so a QEMU outlives a SIGKILLed driver, and the drivers'
# parent-death signals do not help when the drivers die first.  The kernel gives one
# guarantee that holds whatever dies in whatever order: when the init (pid 1) of a PID
# namespace dies, every other process in that namespace is killed.  So the supervisor
# puts its children in a PID namespace of their own, whose init is a tiny process of
# its own (vmrun-nsinit, vmrun/nsinit.c) that dies with the supervisor.  Orphans in the
# namespace (daemonized QEMUs) are re-parented to that init, which reaps them at once.


def unshare_pid_namespace():
    """unshare(CLONE_NEWPID): the next child of this process is the init of a new PID
    namespace, and later children are born in it (until set back with setns).  Needs
    CAP_SYS_ADMIN.  Raises OSError."""
    if unshare(CLONE_NEWPID) != 0:
        _raise_oserror(errno)


def enter_pid_namespace(int fd):
    """setns(fd, CLONE_NEWPID): future children of this process are born in the PID
    namespace open at fd (the process itself stays where it is).  Raises OSError."""
    if setns(fd, CLONE_NEWPID) != 0:
        _raise_oserror(errno)


def private_proc():
    """Give this (single-threaded) process a mount namespace of its own whose /proc shows
    its PID namespace: unshare(CLONE_NEWNS), make every mount private (nothing
    propagates back to the host), mount a new proc on /proc.  Raises OSError."""
    if unshare(CLONE_NEWNS) != 0:
        _raise_oserror(errno)
    if mount(NULL, b"/", NULL, MS_REC | MS_PRIVATE, NULL) != 0:
        _raise_oserror(errno)
    if mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0:
        _raise_oserror(errno)
