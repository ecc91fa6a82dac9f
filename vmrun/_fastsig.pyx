# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, autotestdict=False
"""Async-signal-safe process supervision primitives for the vmrun supervisor.

Design (why this module exists and is built this way)
------------------------------------------------------
The supervisor is a single-threaded Python process that starts one "driver" child per
VM, each in its own process group, and is a child subreaper, so the QEMU processes that
libvirt daemonizes re-parent to it and must be reaped at once.  Python-level signal
handlers cannot do this job: CPython's C handler only sets a flag and the Python handler
runs later, between bytecodes of the main thread.  While the interpreter is stuck in a
long C call (a blocking libvirt call, a big GC pass, a slow import) nothing runs: exited
children pile up as zombies, and a Ctrl-C / SIGTERM aimed at the supervisor is not
passed on to the drivers, which live in other process groups and therefore never see
the terminal's signal.

So we do what uvloop does: install plain C handlers with sigaction(2) that do only
async-signal-safe work, right away, and leave everything else to the Python event loop:

* SIGCHLD: reap with waitpid(-1, WNOHANG) until it returns 0 or -1 and record each
  (pid, raw status) in a fixed-size static buffer.  If the buffer is full the handler
  stops reaping; the rest stay zombies (the kernel keeps their status, nothing is lost)
  until reap() collects them.
* forwarded signals (SIGINT, SIGTERM, SIGHUP, ...): set a per-signal sig_atomic_t flag
  and immediately kill(pid, sig) every registered driver process.  The driver itself,
  not its process group: libvirt's short-lived forks in that group (before QEMU's setsid)
  must not get the user's Ctrl-C; the driver decides what a stop means.
* both then write one byte to a non-blocking wake-up fd (EAGAIN ignored: a full pipe
  already means "wake up") and restore errno.  The Python loop watches the other end of
  that fd, drains it and calls reap() / take_signals() to do the real work.

No handler allocates, takes a lock, touches a Python object or needs the GIL; they are
`noexcept nogil` cdef functions and call only waitpid, kill and write.  The Python-side
functions that read or modify the state the handlers use (exit buffer, pending flags,
process array) do so with those signals blocked by pthread_sigmask, so a handler
never observes a half-updated structure; because all handlers block each other via
sa_mask, they never interleave either.  This mutual exclusion relies on the signals being
delivered to the thread that blocks them, i.e. on the supervisor being single-threaded
(or on every other thread keeping these signals blocked).

The C declarations live in _fastsig.pxd.
"""

import os

# State shared with the signal handlers: C statics, never Python objects.
cdef enum:
    _EXIT_CAP = 4096     # (pid, status) records the SIGCHLD handler can buffer
    _PROC_CAP = 1024    # processes forwarded signals are sent to

EXIT_BUFFER_SIZE = _EXIT_CAP
MAX_PROCESSES = _PROC_CAP

cdef volatile int _wake_fd = -1
cdef volatile sig_atomic_t _pending[NSIG]
cdef pid_t _exit_pid[_EXIT_CAP]
cdef int _exit_status[_EXIT_CAP]
cdef volatile int _exit_len = 0
cdef pid_t _procs[_PROC_CAP]
cdef volatile int _n_procs = 0

# Bookkeeping used only from Python (with the GIL); the handlers never read it.
cdef bint _took[NSIG]            # we replaced this signal's disposition ...
cdef sigaction_t _old[NSIG]      # ... and this is what it was before
cdef bint _forwarding[NSIG]      # currently handled by _on_forward


# ---------------------------------------------------------------- signal handlers

cdef inline void _wake() noexcept nogil:
    cdef char byte = 0
    cdef int fd = _wake_fd
    cdef ssize_t n
    if fd >= 0:
        # Never blocks (O_NONBLOCK).  EAGAIN means a wake-up is already pending;
        # any other error cannot be reported from here, so it is ignored too.
        n = write(fd, &byte, 1)
        if n < 0:
            pass


cdef void _on_sigchld(int signum) noexcept nogil:
    global _exit_len, errno
    cdef int saved_errno = errno
    cdef int status
    cdef pid_t pid
    while _exit_len < _EXIT_CAP:
        status = 0
        pid = waitpid(-1, &status, WNOHANG)
        if pid > 0:
            _exit_pid[_exit_len] = pid
            _exit_status[_exit_len] = status
            _exit_len += 1
        elif pid < 0 and errno == EINTR:
            continue
        else:
            break   # 0: no more exited children; -1 (ECHILD): no children at all
    _wake()
    errno = saved_errno


cdef void _on_forward(int signum) noexcept nogil:
    global errno
    cdef int saved_errno = errno
    cdef int i
    if 0 < signum < NSIG:
        _pending[signum] = 1
    for i in range(_n_procs):
        kill(_procs[i], signum)
    _wake()
    errno = saved_errno


# ---------------------------------------------------------------- helpers

cdef int _raise_oserror(int err) except -1:
    raise OSError(err, os.strerror(err))


cdef void _block_handled(sigset_t *oldmask) noexcept nogil:
    """Block SIGCHLD and every signal we currently handle; save the old mask."""
    cdef sigset_t block
    cdef int sig
    sigemptyset(&block)
    sigaddset(&block, SIGCHLD)
    for sig in range(1, NSIG):
        if _took[sig]:
            sigaddset(&block, sig)
    pthread_sigmask(SIG_BLOCK, &block, oldmask)


cdef inline void _restore_mask(const sigset_t *oldmask) noexcept nogil:
    pthread_sigmask(SIG_SETMASK, oldmask, NULL)


cdef int _take_over(int sig, const sigaction_t *act) except -1:
    """sigaction(sig, act), remembering the original disposition the first time."""
    cdef int rc
    if _took[sig]:
        rc = sigaction(sig, act, NULL)
    else:
        rc = sigaction(sig, act, &_old[sig])
    if rc != 0:
        _raise_oserror(errno)
    _took[sig] = True
    return 0


cdef int _give_back(int sig) except -1:
    """Restore the disposition sig had before we took it over."""
    if not _took[sig]:
        return 0
    if sigaction(sig, &_old[sig], NULL) != 0:
        _raise_oserror(errno)
    _took[sig] = False
    _forwarding[sig] = False
    return 0


cdef int _check_forwardable(int sig) except -1:
    if sig < 1 or sig >= NSIG:
        raise ValueError(f"signal number out of range: {sig}")
    if sig == SIGCHLD or sig == SIGKILL or sig == SIGSTOP:
        raise ValueError(f"signal {sig} cannot be forwarded")
    return 0


# ---------------------------------------------------------------- public API

def set_child_subreaper():
    """Make this process a child subreaper: prctl(PR_SET_CHILD_SUBREAPER, 1).

    Orphaned descendants (e.g. QEMU processes that libvirt daemonizes) are then
    re-parented to this process instead of init, so its SIGCHLD handler reaps them.
    Raises OSError if prctl fails.
    """
    if prctl(PR_SET_CHILD_SUBREAPER, <unsigned long>1, <unsigned long>0,
             <unsigned long>0, <unsigned long>0) != 0:
        _raise_oserror(errno)


def set_pdeathsig(int signum, int expected_ppid):
    """Ask for signum when the parent dies: prctl(PR_SET_PDEATHSIG, signum).

    The parent may already have died before the prctl took effect, in which case
    the signal will never come.  So afterwards getppid() is compared with
    expected_ppid (the parent's pid, taken before fork): returns True if the parent
    is still ours, False if it is already gone -- the caller should then act as if
    the signal had arrived.  signum 0 clears the setting.  The setting is cleared in
    children by fork() and tied to the parent *thread*.  Raises OSError if prctl
    fails (e.g. an invalid signal number).
    """
    if prctl(PR_SET_PDEATHSIG, <unsigned long>signum, <unsigned long>0,
             <unsigned long>0, <unsigned long>0) != 0:
        _raise_oserror(errno)
    return getppid() == expected_ppid


def enter_netns(int fd):
    """Move the calling thread into the network namespace open at fd: setns(fd, NEWNET).

    Used by a driver (before it opens libvirt, so QEMU and its taps live there) and by the
    port forwarder.  Sockets created afterwards belong to that namespace; sockets created
    before keep theirs.  Raises OSError if setns fails.
    """
    if setns(fd, CLONE_NEWNET) != 0:
        _raise_oserror(errno)


def install(int wake_fd, forward):
    """Install the C-level SIGCHLD handler and forwarding handlers.

    wake_fd: fd (normally the write end of a pipe) to which every handler run writes
    one byte; it is switched to O_NONBLOCK here.  forward: the signal numbers (e.g.
    SIGINT, SIGTERM, SIGHUP) that are recorded for take_signals() and immediately
    sent to every registered process.

    Handlers use SA_RESTART (SIGCHLD also SA_NOCLDSTOP) and block each other while
    running.  Calling install() again replaces the wake fd and the forwarded set;
    signals dropped from the set get their original disposition back.  Note that the
    SIGCHLD handler reaps *every* child of the process (waitpid(-1)), so statuses
    must be taken from reap(), not from os.waitpid or subprocess.  A process forked
    without exec inherits the handlers and should call uninstall().

    Raises ValueError for an unusable signal number (SIGCHLD, SIGKILL, SIGSTOP or
    out of range) and OSError if fcntl or sigaction fails.
    """
    global _wake_fd
    cdef sigset_t newset, oldmask
    cdef sigaction_t act
    cdef int sig, flags
    sigemptyset(&newset)
    for obj in forward:
        sig = obj
        _check_forwardable(sig)
        sigaddset(&newset, sig)

    flags = fcntl(wake_fd, F_GETFL)
    if flags < 0:
        _raise_oserror(errno)
    if not (flags & O_NONBLOCK) and fcntl(wake_fd, F_SETFL, flags | O_NONBLOCK) < 0:
        _raise_oserror(errno)

    # Every handler blocks SIGCHLD and all forwarded signals while it runs.
    sigemptyset(&act.sa_mask)
    sigaddset(&act.sa_mask, SIGCHLD)
    for sig in range(1, NSIG):
        if sigismember(&newset, sig) == 1:
            sigaddset(&act.sa_mask, sig)

    # Block what is handled now and what will be handled, then swap.
    _block_handled(&oldmask)
    pthread_sigmask(SIG_BLOCK, &act.sa_mask, NULL)
    try:
        _wake_fd = wake_fd
        act.sa_handler = _on_sigchld
        act.sa_flags = SA_RESTART | SA_NOCLDSTOP
        _take_over(SIGCHLD, &act)
        act.sa_handler = _on_forward
        act.sa_flags = SA_RESTART
        for sig in range(1, NSIG):
            if sigismember(&newset, sig) == 1:
                _take_over(sig, &act)
                _forwarding[sig] = True
            elif _forwarding[sig]:
                _give_back(sig)
    finally:
        _restore_mask(&oldmask)


def uninstall():
    """Restore the dispositions install() replaced and forget the wake fd.

    Buffered exit statuses, pending signal flags and registered processes are
    kept: reap(), take_signals() and forward() still work (reap() then only finds
    what the kernel still holds as zombies plus what was buffered).  Raises OSError
    if a disposition cannot be restored (the others are restored regardless).
    """
    global _wake_fd
    cdef sigset_t oldmask
    cdef int sig
    cdef int err = 0
    _block_handled(&oldmask)
    try:
        for sig in range(1, NSIG):
            if _took[sig]:
                if sigaction(sig, &_old[sig], NULL) != 0:
                    err = errno
                else:
                    _took[sig] = False
                    _forwarding[sig] = False
        _wake_fd = -1
    finally:
        _restore_mask(&oldmask)
    if err:
        _raise_oserror(err)


def register_process(pid_t pid):
    """Add process pid to the processes forwarded signals are sent to.

    Registering a process twice has no further effect.  Raises ValueError if
    pid <= 1 (never signal init) and OverflowError if MAX_PROCESSES processes are
    already registered.  Unregister a process once it has been reaped, before its pid
    can be reused.
    """
    global _n_procs
    cdef sigset_t oldmask
    cdef int i
    if pid <= 1:
        raise ValueError(f"invalid process id: {pid}")
    _block_handled(&oldmask)
    try:
        for i in range(_n_procs):
            if _procs[i] == pid:
                return
        if _n_procs >= _PROC_CAP:
            raise OverflowError(f"more than {_PROC_CAP} processes registered")
        _procs[_n_procs] = pid
        _n_procs += 1
    finally:
        _restore_mask(&oldmask)


def unregister_process(pid_t pid):
    """Stop forwarding signals to process pid (no-op if not registered)."""
    global _n_procs
    cdef sigset_t oldmask
    cdef int i
    _block_handled(&oldmask)
    try:
        for i in range(_n_procs):
            if _procs[i] == pid:
                _n_procs -= 1
                _procs[i] = _procs[_n_procs]
                break
    finally:
        _restore_mask(&oldmask)


def forward(int signum):
    """Send signum to every registered process now; return how many kill()s succeeded.

    Raises ValueError if signum is out of range (0 is allowed: an existence check).
    """
    cdef sigset_t oldmask
    cdef int i
    cdef int ok = 0
    if signum < 0 or signum >= NSIG:
        raise ValueError(f"signal number out of range: {signum}")
    _block_handled(&oldmask)
    for i in range(_n_procs):
        if kill(_procs[i], signum) == 0:
            ok += 1
    _restore_mask(&oldmask)
    return ok


def reap():
    """Return and clear every (pid, raw wait status) collected so far, in order.

    With SIGCHLD blocked, drains the handler's buffer and then runs the
    waitpid(-1, WNOHANG) loop once more to catch children the handler left as
    zombies (buffer full, or handler not installed).  Decode the statuses with
    os.waitstatus_to_exitcode() / os.WIFSIGNALED() etc.
    """
    global _exit_len
    cdef sigset_t block, oldmask
    cdef int i, status
    cdef pid_t pid
    out = []
    sigemptyset(&block)
    sigaddset(&block, SIGCHLD)
    pthread_sigmask(SIG_BLOCK, &block, &oldmask)
    try:
        for i in range(_exit_len):
            out.append((_exit_pid[i], _exit_status[i]))
        _exit_len = 0
        while True:
            status = 0
            pid = waitpid(-1, &status, WNOHANG)
            if pid > 0:
                out.append((pid, status))
            elif pid < 0 and errno == EINTR:
                continue
            else:
                break
    finally:
        _restore_mask(&oldmask)
    return out


def take_signals():
    """Return the forwarded signals that arrived since the last call and clear them.

    Each signal number appears once, in ascending order, however often it arrived.
    """
    cdef sigset_t oldmask
    cdef int sig
    out = []
    _block_handled(&oldmask)
    try:
        for sig in range(1, NSIG):
            if _pending[sig]:
                out.append(sig)
                _pending[sig] = 0
    finally:
        _restore_mask(&oldmask)
    return out


include "_fastsig_ns.pxi"
include "_fastsig_fork.pxi"
