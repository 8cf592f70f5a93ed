# What a C thread that serves an event loop needs: a mutex and a condition to
# be handed work, an eventfd to tell the loop, and arrays that grow. For the
# core modules that run such a thread (journal, record_reader). Inline: no
# module of its own.
from libc.stdlib cimport realloc
from posix.time cimport timespec


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t* mutex, const void* attributes)
    int pthread_mutex_destroy(pthread_mutex_t* mutex)
    int pthread_mutex_lock(pthread_mutex_t* mutex)
    int pthread_mutex_unlock(pthread_mutex_t* mutex)
    int pthread_cond_init(pthread_cond_t* condition, const void* attributes)
    int pthread_cond_destroy(pthread_cond_t* condition)
    int pthread_cond_wait(pthread_cond_t* condition, pthread_mutex_t* mutex)
    int pthread_cond_timedwait(pthread_cond_t* condition, pthread_mutex_t* mutex, const timespec* deadline)
    int pthread_cond_signal(pthread_cond_t* condition)


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum: EFD_NONBLOCK
    enum: EFD_CLOEXEC


cdef inline int grow_array(void** items, Py_ssize_t* capacity, Py_ssize_t wanted,
                           size_t item_size, Py_ssize_t initial) noexcept nogil:
    """Room for `wanted` items in *items (capacity doubling from `initial`):
    0, or -1 when memory is short (the array is then unchanged)."""
    cdef Py_ssize_t grown_capacity = capacity[0] if capacity[0] > 0 else initial
    cdef void* grown
    if wanted <= capacity[0]:
        return 0
    while grown_capacity < wanted:
        grown_capacity *= 2
    grown = realloc(items[0], grown_capacity * item_size)
    if grown == NULL:
        return -1
    items[0] = grown
    capacity[0] = grown_capacity
    return 0


cdef inline void unlock_and_wake(pthread_mutex_t* mutex, pthread_cond_t* condition) noexcept nogil:
    """Release the mutex, then wake the thread waiting on the condition. Woken
    while the mutex is still held, it would run only to block on the mutex
    and be woken again by the unlock: two more futex calls and a context
    switch for each hand-over."""
    pthread_mutex_unlock(mutex)
    pthread_cond_signal(condition)


cdef inline void raise_and_wake(pthread_mutex_t* mutex, pthread_cond_t* condition, int* flag) noexcept nogil:
    """Set *flag under the mutex (a thread's "closing", say), then wake the
    thread waiting on the condition to look at it."""
    pthread_mutex_lock(mutex)
    flag[0] = 1
    unlock_and_wake(mutex, condition)
