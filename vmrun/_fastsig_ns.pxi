# Included by _fastsig.pyx: the stack's PID namespace.
#
# Why: libvirt daemonizes QEMU, so a QEMU outlives a SIGKILLed driver, and the drivers'
# parent-death signals do not help when the drivers die first.  The kernel gives one
# guarantee that holds whatever dies in whatever order: when the init (pid 1) of a PID
# namespace dies, every other process in that namespace is killed.  So the supervisor
# puts its children in a PID namespace of their own, whose init is a tiny process of
# its own (namespace_init below) that dies with the supervisor.  Orphans in the
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


def namespace_init(int guard_fd):
    """Be the init of a PID namespace until the supervisor dies; never returns.

    To be called in the child forked right after unshare_pid_namespace().  guard_fd is
    the read end of a pipe whose write end only the supervisor holds: EOF there (or the
    parent-death signal, SIGKILL) means the supervisor is gone, and this process exits,
    which makes the kernel kill every process of the namespace.  Meanwhile it reaps
    every orphan at once (a QEMU zombie would keep libvirt waiting).  Only
    async-signal-safe calls after the fork: no Python object is touched in the loop.
    """
    cdef sigset_t every, chld
    cdef pollfd fds[2]
    cdef char buf[256]  # room for a signalfd_siginfo (128 bytes)
    cdef int sfd
    cdef ssize_t n
    with nogil:
        sigfillset(&every)
        pthread_sigmask(SIG_SETMASK, &every, NULL)
        prctl(PR_SET_PDEATHSIG, <unsigned long>SIGKILL, <unsigned long>0,
              <unsigned long>0, <unsigned long>0)
        dup2(guard_fd, 3)
        close_range(4, 0xFFFFFFFFU, 0)
        sigemptyset(&chld)
        sigaddset(&chld, SIGCHLD)
        sfd = signalfd(-1, &chld, SFD_CLOEXEC)
        if sfd < 0:
            _exit(1)
        fds[0].fd = 3
        fds[0].events = POLLIN
        fds[1].fd = sfd
        fds[1].events = POLLIN
        while True:
            while waitpid(-1, NULL, WNOHANG) > 0:
                pass
            if poll(fds, 2, -1) < 0:
                continue
            if fds[1].revents:
                read(sfd, buf, sizeof(buf))  # drain; the loop reaps
            if fds[0].revents:
                n = read(3, buf, sizeof(buf))
                if n <= 0:  # the supervisor is gone
                    _exit(0)
