/* How the load generator and the constant-response server stop: SIGINT and
   SIGTERM arrive on a signalfd that their epoll loop watches, and a peer that
   hangs up does not kill them (SIGPIPE ignored). Header-only, like http_head.h. */
#ifndef PAYCORE_PERF_STOP_SIGNALS_H
#define PAYCORE_PERF_STOP_SIGNALS_H

#include <signal.h>
#include <sys/signalfd.h>

/* The signalfd (flags: SFD_NONBLOCK or 0; it is close-on-exec), or -1. */
static inline int stop_signal_fd(int flags)
{
    signal(SIGPIPE, SIG_IGN);
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    sigprocmask(SIG_BLOCK, &stop_signals, NULL);
    return signalfd(-1, &stop_signals, flags | SFD_CLOEXEC);
}

#endif
