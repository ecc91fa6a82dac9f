# Extern C declarations for vmrun/_fastsig.pyx (cimported implicitly: same module name).
#
# Only what the module uses is declared.  Everything declared `nogil` here is callable
# from the signal handlers; the ones they actually call (waitpid, kill, write, and the
# errno access) are async-signal-safe per signal-safety(7).

cdef extern from "<sys/types.h>" nogil:
    ctypedef int pid_t

cdef extern from "<errno.h>" nogil:
    # `errno` is a thread-local lvalue macro in glibc; Cython emits plain `errno`.
    int errno
    enum:
        EINTR
        EAGAIN
        EWOULDBLOCK
        ECHILD
        EINVAL

cdef extern from "<signal.h>" nogil:
    ctypedef int sig_atomic_t
    ctypedef struct sigset_t:
        pass

    ctypedef void (*sighandler_t)(int) noexcept nogil

    # `struct sigaction` shares its name with the function, hence the C-name string.
    # In glibc sa_handler is a macro into a union, which `act.sa_handler` still reaches.
    cdef struct sigaction_t "sigaction":
        sighandler_t sa_handler
        sigset_t sa_mask
        int sa_flags

    enum:
        NSIG    # one past the highest signal number (glibc: 65, includes real-time)
        SIGCHLD
        SIGKILL
        SIGSTOP
        SA_RESTART
        SA_NOCLDSTOP
        SIG_BLOCK
        SIG_SETMASK

    int sigaction(int signum, const sigaction_t *act, sigaction_t *oldact)
    int sigemptyset(sigset_t *s)
    int sigfillset(sigset_t *s)
    int sigaddset(sigset_t *s, int signum)
    int sigismember(const sigset_t *s, int signum)
    int pthread_sigmask(int how, const sigset_t *s, sigset_t *oldset)
    int kill(pid_t pid, int sig)

cdef extern from "<sys/wait.h>" nogil:
    enum:
        WNOHANG
    pid_t waitpid(pid_t pid, int *wstatus, int options)

cdef extern from "<sys/prctl.h>" nogil:
    enum:
        PR_SET_PDEATHSIG
        PR_SET_CHILD_SUBREAPER
    # Variadic in the header; callers pass every argument as unsigned long.
    int prctl(int option, ...)

cdef extern from "<unistd.h>" nogil:
    ssize_t write(int fd, const void *buf, size_t count)
    ssize_t read(int fd, void *buf, size_t count)
    pid_t getppid()
    int dup2(int oldfd, int newfd)

cdef extern from "<fcntl.h>" nogil:
    enum:
        F_GETFL
        F_SETFL
        O_NONBLOCK
    int fcntl(int fd, int cmd, ...)


cdef extern from "<sched.h>" nogil:
    int setns(int fd, int nstype)
    int unshare(int flags)
    enum:
        CLONE_NEWNET
        CLONE_NEWPID
        CLONE_NEWNS

# For _fastsig_ns.pxi (a driver's own /proc).
cdef extern from "<sys/mount.h>" nogil:
    enum:
        MS_REC
        MS_PRIVATE
        MS_NOSUID
        MS_NODEV
        MS_NOEXEC
    int mount(const char *source, const char *target, const char *fstype,
              unsigned long flags, const void *data)

# For _fastsig_fork.pxi (the driver zygote).
cdef extern from "<sched.h>" nogil:
    enum:
        CLONE_PARENT

cdef extern from "<sys/syscall.h>" nogil:
    enum:
        SYS_clone

cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)

cdef extern from "<string.h>" nogil:
    void *memcpy(void *dest, const void *src, size_t n)
    void *memset(void *s, int c, size_t n)
    int memcmp(const void *a, const void *b, size_t n)

cdef extern from "<stdint.h>" nogil:
    ctypedef unsigned long uintptr_t

cdef extern from "Python.h":
    void PyOS_BeforeFork()
    void PyOS_AfterFork_Parent()
    void PyOS_AfterFork_Child()

cdef extern from "<malloc.h>" nogil:
    int malloc_trim(size_t pad)
