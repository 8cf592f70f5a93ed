/* A slow disk, for tests: preloaded into a service instance (LD_PRELOAD), it
 * makes every fdatasync of a journal segment wait SLOW_DISK_STALL_MS while
 * the file SLOW_DISK_TRIGGER exists, as a disk stalled by writeback would. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int (*real_fdatasync)(int);

static int is_journal_segment(int fd) {
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t length = readlink(link, path, sizeof path - 1);
    if (length <= 0)
        return 0;
    path[length] = 0;
    return strstr(path, "/journal-") != NULL && strstr(path, ".seg") != NULL;
}

int fdatasync(int fd) {
    if (real_fdatasync == NULL)
        real_fdatasync = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    const char *trigger = getenv("SLOW_DISK_TRIGGER");
    const char *stall_ms = getenv("SLOW_DISK_STALL_MS");
    if (trigger != NULL && stall_ms != NULL && access(trigger, F_OK) == 0 && is_journal_segment(fd)) {
        long ms = atol(stall_ms);
        struct timespec stall = {ms / 1000, (ms % 1000) * 1000000L};
        nanosleep(&stall, NULL);
    }
    return real_fdatasync(fd);
}
