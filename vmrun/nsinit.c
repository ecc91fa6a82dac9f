/* vmrun-nsinit: the init (pid 1) of a stack's PID namespace (see vmrun/pidns.py).
 *
 * Started by the supervisor right after unshare(CLONE_NEWPID), with the read end of a
 * guard pipe on fd 3 whose write end only the supervisor holds.  It reaps every orphan
 * of the namespace at once (a daemonized QEMU whose driver is gone would otherwise stay
 * a zombie, and libvirt waits for it) and exits when the supervisor is gone: EOF on the
 * guard pipe, or SIGKILL as its parent-death signal.  The kernel then kills every other
 * process of the namespace.  A program of its own, not a fork of the supervisor: a fork
 * kept ~11 MiB of the supervisor's memory alive for as long as the stack ran.
 */
#define _GNU_SOURCE
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#define GUARD_FD 3

int main(void)
{
    sigset_t every, chld;
    struct pollfd fds[2];
    char buf[256]; /* room for a signalfd_siginfo (128 bytes) */
    int sfd;

    sigfillset(&every);
    sigprocmask(SIG_SETMASK, &every, NULL);
    prctl(PR_SET_PDEATHSIG, (unsigned long)SIGKILL, 0UL, 0UL, 0UL);
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sfd = signalfd(-1, &chld, SFD_CLOEXEC);
    if (sfd < 0)
        return 1;
    fds[0].fd = GUARD_FD;
    fds[0].events = POLLIN;
    fds[1].fd = sfd;
    fds[1].events = POLLIN;
    for (;;) {
        while (waitpid(-1, NULL, WNOHANG) > 0)
            ;
        if (poll(fds, 2, -1) < 0)
            continue;
        if (fds[1].revents && read(sfd, buf, sizeof(buf)) < 0)
            continue; /* drained; the loop reaps */
        if (fds[0].revents && read(GUARD_FD, buf, sizeof(buf)) <= 0)
            return 0; /* the supervisor is gone */
    }
}
