/* A binary min-heap of timers by due time, shared by the load generator and the
   processor emulator. A timer is embedded in what it times (container_of gives
   that back); the heap holds pointers to the timers, and each knows its place.
   Header-only, like http_head.h. */
#ifndef PAYCORE_PERF_TIMER_HEAP_H
#define PAYCORE_PERF_TIMER_HEAP_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define container_of(pointer, type, member) ((type *)((char *)(pointer) - offsetof(type, member)))

struct timer {
    int64_t due_ns;
    int heap_index; /* -1 while not scheduled */
};

struct timer_heap {
    struct timer **timers;
    int len, capacity;
};

/* Room for this many timers at once; past it the heap grows (exits if memory runs out). */
static inline void timer_heap_reserve(struct timer_heap *heap, int capacity)
{
    if (capacity <= heap->capacity)
        return;
    struct timer **grown = realloc(heap->timers, (size_t)capacity * sizeof *grown);
    if (!grown) {
        fputs("out of memory for timers\n", stderr);
        exit(1);
    }
    heap->timers = grown;
    heap->capacity = capacity;
}

static inline void timer_heap_place(struct timer_heap *heap, int index, struct timer *timer)
{
    heap->timers[index] = timer;
    timer->heap_index = index;
}

static inline void timer_heap_sift_up(struct timer_heap *heap, int index)
{
    struct timer *timer = heap->timers[index];
    while (index > 0) {
        int parent = (index - 1) / 2;
        if (heap->timers[parent]->due_ns <= timer->due_ns)
            break;
        timer_heap_place(heap, index, heap->timers[parent]);
        index = parent;
    }
    timer_heap_place(heap, index, timer);
}

static inline void timer_heap_sift_down(struct timer_heap *heap, int index)
{
    struct timer *timer = heap->timers[index];
    for (;;) {
        int child = 2 * index + 1;
        if (child >= heap->len)
            break;
        if (child + 1 < heap->len && heap->timers[child + 1]->due_ns < heap->timers[child]->due_ns)
            child++;
        if (heap->timers[child]->due_ns >= timer->due_ns)
            break;
        timer_heap_place(heap, index, heap->timers[child]);
        index = child;
    }
    timer_heap_place(heap, index, timer);
}

/* Schedules the timer at due_ns, or moves it there if it is scheduled already. */
static inline void timer_schedule(struct timer_heap *heap, struct timer *timer, int64_t due_ns)
{
    timer->due_ns = due_ns;
    if (timer->heap_index < 0) {
        if (heap->len == heap->capacity)
            timer_heap_reserve(heap, heap->capacity ? heap->capacity * 2 : 64);
        timer_heap_place(heap, heap->len++, timer);
        timer_heap_sift_up(heap, timer->heap_index);
    } else {
        timer_heap_sift_up(heap, timer->heap_index);
        timer_heap_sift_down(heap, timer->heap_index);
    }
}

static inline void timer_cancel(struct timer_heap *heap, struct timer *timer)
{
    int index = timer->heap_index;
    if (index < 0)
        return;
    timer->heap_index = -1;
    struct timer *last = heap->timers[--heap->len];
    if (index < heap->len) {
        timer_heap_place(heap, index, last);
        timer_heap_sift_up(heap, index);
        timer_heap_sift_down(heap, last->heap_index);
    }
}

/* How long epoll_pwait2 may wait for something due at due_ns (in timeout), or NULL
   (no limit) when nothing is due (due_ns < 0). Nanoseconds: rounding wake-ups to
   whole milliseconds would fire every timer due within the same millisecond together. */
static inline struct timespec *timer_wait(int64_t due_ns, int64_t now_ns, struct timespec *timeout)
{
    if (due_ns < 0)
        return NULL;
    int64_t wait_ns = due_ns > now_ns ? due_ns - now_ns : 0;
    timeout->tv_sec = wait_ns / 1000000000;
    timeout->tv_nsec = wait_ns % 1000000000;
    return timeout;
}

/* The timer due first, or NULL. */
static inline struct timer *timer_first(const struct timer_heap *heap)
{
    return heap->len > 0 ? heap->timers[0] : NULL;
}

#endif
