# cython: language_level=3
"""Which correlationIds the payments record holds, read on a thread of its
own without the GIL.

Use: RecordLookup(path) once the record's schema exists; run serve() in a
thread of its own; ask(ids) from the event loop; when event_fd is readable,
answers() returns the answers of every id asked so far, in the order asked.
stop(), wait for serve() to return, then close().
"""
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memcpy
from posix.unistd cimport close, read, write

from paycore.core.correlation_id cimport UUID_BYTES
from paycore.core.loop_threads cimport (
    EFD_CLOEXEC, EFD_NONBLOCK, eventfd, grow_array, pthread_cond_destroy, pthread_cond_init,
    pthread_cond_wait, pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock,
    pthread_mutex_unlock, unlock_and_wake,
)
from paycore.core.posix_files cimport raise_os_error


cdef extern from "sqlite3.h" nogil:
    enum:
        SQLITE_OK
        SQLITE_ROW
        SQLITE_DONE
        SQLITE_OPEN_READWRITE
        SQLITE_OPEN_NOMUTEX
    ctypedef void (*sqlite3_destructor_type)(void*)
    sqlite3_destructor_type SQLITE_STATIC
    int sqlite3_open_v2(const char* filename, sqlite3** db, int flags, const char* vfs)
    int sqlite3_close_v2(sqlite3* db)
    int sqlite3_busy_timeout(sqlite3* db, int milliseconds)
    int sqlite3_exec(sqlite3* db, const char* sql, void* callback, void* argument, char** error)
    int sqlite3_prepare_v3(sqlite3* db, const char* sql, int bytes, unsigned int flags,
                           sqlite3_stmt** statement, const char** tail)
    int sqlite3_bind_blob(sqlite3_stmt* statement, int index, const void* value, int bytes,
                          sqlite3_destructor_type destructor)
    int sqlite3_step(sqlite3_stmt* statement)
    int sqlite3_reset(sqlite3_stmt* statement)
    int sqlite3_finalize(sqlite3_stmt* statement)
    int sqlite3_column_int(sqlite3_stmt* statement, int column)
    long long sqlite3_column_int64(sqlite3_stmt* statement, int column)
    const char* sqlite3_errmsg(sqlite3* db)
    const char* sqlite3_errstr(int code)
    enum:
        SQLITE_PREPARE_PERSISTENT


# The record's schema is record_sql.py's: payments_by_id makes this one probe.
cdef const char* LOOKUP_SQL = (b"SELECT cents, processor, requested_at_ms FROM payments "
                               b"WHERE correlation_id = ?1")
# As long as the record's own connections wait for another instance's transaction.
cdef int BUSY_TIMEOUT_MS = 30000
cdef Py_ssize_t INITIAL_ANSWERS = 64


cdef inline int answers_reserve(AnswerList* answers, Py_ssize_t wanted) noexcept nogil:
    """0, or -1 when memory is short."""
    return grow_array(<void**>&answers.items, &answers.capacity, wanted, sizeof(LookupAnswer), INITIAL_ANSWERS)


cdef class RecordLookup:
    """A connection of its own to the record at `path`, which only reads."""

    def __cinit__(self):
        pthread_mutex_init(&self.mutex, NULL)
        pthread_cond_init(&self.work_ready, NULL)
        self.event_fd = -1

    def __init__(self, str path):
        self.path = path
        cdef bytes encoded = path.encode()
        cdef int code = sqlite3_open_v2(encoded, &self.db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL)
        if code == SQLITE_OK:
            sqlite3_busy_timeout(self.db, BUSY_TIMEOUT_MS)
            code = sqlite3_exec(self.db, b"PRAGMA query_only = 1", NULL, NULL, NULL)
        if code == SQLITE_OK:
            code = sqlite3_prepare_v3(self.db, LOOKUP_SQL, -1, SQLITE_PREPARE_PERSISTENT, &self.statement, NULL)
        cdef const char* message
        if code != SQLITE_OK:
            message = sqlite3_errmsg(self.db) if self.db != NULL else sqlite3_errstr(code)
            self._release()
            raise OSError(f"payments record {path}: {message.decode(errors='replace')}")
        self.event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.event_fd < 0:
            self._release()
            raise_os_error(path)

    def __dealloc__(self):
        if self.serving:
            return  # the thread still uses this memory: leak rather than crash
        self._release()
        free(self.asked.items)
        free(self.answered.items)
        pthread_mutex_destroy(&self.mutex)
        pthread_cond_destroy(&self.work_ready)

    def _release(self):
        if self.statement != NULL:
            sqlite3_finalize(self.statement)
            self.statement = NULL
        if self.db != NULL:
            sqlite3_close_v2(self.db)
            self.db = NULL
        if self.event_fd >= 0:
            close(self.event_fd)
            self.event_fd = -1

    def ask(self, list correlation_ids not None) -> None:
        """Look these ids up (16 bytes each), after every id asked before."""
        cdef Py_ssize_t count = len(correlation_ids)
        cdef bytes correlation_id
        cdef LookupAnswer* item
        for correlation_id in correlation_ids:
            if correlation_id is None or len(correlation_id) != UUID_BYTES:
                raise ValueError("a correlationId is 16 bytes")
        pthread_mutex_lock(&self.mutex)
        if (answers_reserve(&self.asked, self.asked.count + count) != 0
                or answers_reserve(&self.answered, self.unread + count) != 0):
            pthread_mutex_unlock(&self.mutex)
            raise MemoryError("record lookups")
        item = &self.asked.items[self.asked.count]
        for correlation_id in correlation_ids:
            memcpy(item.uuid, <const char*>correlation_id, UUID_BYTES)
            item += 1
        self.asked.count += count
        self.unread += count
        unlock_and_wake(&self.mutex, &self.work_ready)

    def answers(self) -> list:
        """(correlation_id, status, cents, processor, requested_at_ms, error)
        for each id answered since the last call, in the order asked."""
        cdef uint64_t counter
        cdef Py_ssize_t index
        cdef LookupAnswer* item
        read(self.event_fd, &counter, sizeof(counter))
        result = []
        # The thread never takes the GIL: holding both here cannot deadlock.
        pthread_mutex_lock(&self.mutex)
        try:
            for index in range(self.answered.count):
                item = &self.answered.items[index]
                result.append((item.uuid[:UUID_BYTES], item.status, item.cents, item.processor,
                               item.requested_at_ms, item.error))
        finally:
            self.unread -= self.answered.count
            self.answered.count = 0
            pthread_mutex_unlock(&self.mutex)
        return result

    def serve(self) -> None:
        """The reader: run in a thread of its own until stop() (at once if
        stop() came first), after answering every id asked before it."""
        # With the GIL: the thread that holds the mutex never waits for it.
        pthread_mutex_lock(&self.mutex)
        refused = self.serving or self.statement == NULL
        if not refused:
            self.serving = True
        pthread_mutex_unlock(&self.mutex)
        if refused:
            raise RuntimeError("the lookup is already served, or closed")
        with nogil:
            self.serve_raw()

    cdef void serve_raw(self) noexcept nogil:
        cdef AnswerList batch
        cdef Py_ssize_t index
        cdef uint64_t one = 1
        batch.items = NULL
        batch.count = batch.capacity = 0
        pthread_mutex_lock(&self.mutex)
        while True:
            while self.asked.count == 0 and not self.closing:
                pthread_cond_wait(&self.work_ready, &self.mutex)
            if self.asked.count == 0:
                break
            batch, self.asked = self.asked, batch
            pthread_mutex_unlock(&self.mutex)
            for index in range(batch.count):
                self.answer(&batch.items[index])
            pthread_mutex_lock(&self.mutex)
            # ask() made room for every id not yet read.
            memcpy(&self.answered.items[self.answered.count], batch.items, batch.count * sizeof(LookupAnswer))
            if self.answered.count == 0:
                write(self.event_fd, &one, sizeof(one))
            self.answered.count += batch.count
            batch.count = 0
        self.serving = False
        pthread_mutex_unlock(&self.mutex)
        free(batch.items)

    cdef void answer(self, LookupAnswer* item) noexcept nogil:
        cdef int code = sqlite3_bind_blob(self.statement, 1, item.uuid, UUID_BYTES, SQLITE_STATIC)
        if code == SQLITE_OK:
            code = sqlite3_step(self.statement)
        if code == SQLITE_ROW:
            item.status = FOUND
            item.cents = sqlite3_column_int64(self.statement, 0)
            item.processor = sqlite3_column_int(self.statement, 1)
            item.requested_at_ms = sqlite3_column_int64(self.statement, 2)
            item.error = 0
        elif code == SQLITE_DONE:
            item.status = ABSENT
            item.error = 0
        else:
            item.status = FAILED
            item.error = code
        sqlite3_reset(self.statement)

    def stop(self) -> None:
        """Ask serve() to answer what was asked and return."""
        with nogil:
            pthread_mutex_lock(&self.mutex)
            self.closing = True
            unlock_and_wake(&self.mutex, &self.work_ready)

    def close(self) -> None:
        """Close the connection once serve() has returned (or never ran)."""
        if self.serving:
            raise RuntimeError("the lookup still runs: stop() it and wait for serve() to return")
        self._release()
