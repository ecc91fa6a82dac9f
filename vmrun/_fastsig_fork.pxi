# Included by _fastsig.pyx: what the driver zygote (vmrun/proc/zygote.py) and its
# forks need.
#
# Why: a driver started as a fresh Python spends ~0.1-0.25 s importing its code and
# libvirt, and holds ~20 MiB of its own.  The zygote imports all that once and forks a
# driver per request.  But the supervisor reaps its drivers and reads their exit
# statuses (vmrun/children.py), so a driver must be the supervisor's child, not the
# zygote's: fork_sibling() is fork(2) with CLONE_PARENT.  And tools and users find a
# driver by its command line: set_cmdline() rewrites the zygote's in the fork.


def fork_sibling():
    """Fork a child whose parent is this process's parent (clone(CLONE_PARENT)), with
    CPython's fork bookkeeping around it; return 0 in the child, its pid (as this
    process sees it) in the parent.  Its exit signal is SIGCHLD, to that parent.  Only
    for a single-threaded process that is not the init of a PID namespace (the kernel
    refuses CLONE_PARENT there).  Raises OSError."""
    cdef long pid
    cdef int err
    PyOS_BeforeFork()
    pid = syscall(SYS_clone, <long>(CLONE_PARENT | SIGCHLD), <long>0, <long>0, <long>0,
                  <long>0)
    err = errno
    if pid == 0:
        PyOS_AfterFork_Child()
        return 0
    PyOS_AfterFork_Parent()
    if pid < 0:
        _raise_oserror(err)
    return pid


def set_cmdline(bytes expected, bytes title):
    """Make /proc/self/cmdline read `title` (NUL-separated arguments): overwrite the
    memory the kernel shows there (arg_start..arg_end of /proc/self/stat), padding with
    NULs.  Only if that memory holds exactly `expected` and `title` fits; returns
    whether it was done.  Python keeps its own copies of argv, so nothing reads it."""
    cdef uintptr_t start, end
    cdef char *area
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])  # fields 48 and 49 of proc(5)
    if <Py_ssize_t>(end - start) != len(expected) or len(title) > len(expected):
        return False
    area = <char *>start
    if memcmp(area, <const char *>expected, len(expected)) != 0:
        return False
    memset(area, 0, len(expected))
    memcpy(area, <const char *>title, len(title))
    return True


def trim_heap():
    """Give the C heap's free memory back to the kernel (glibc's malloc_trim(0)): a driver
    calls it once its guest runs, after libvirt has freed what starting it took (~3 MiB
    of a driver's ~8 MiB of its own here).  Returns whether anything was released."""
    cdef int released
    with nogil:
        released = malloc_trim(0)
    return released != 0
