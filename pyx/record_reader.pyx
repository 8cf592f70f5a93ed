# cython: language_level=3
"""The payments record's reads, answered on a thread of its own without the
GIL: which correlationIds it holds, and summaries.

Use: RecordReader(path, summary_statements) once the record's schema exists;
run serve() in a thread of its own; ask(ids) and ask_summary(statement,
parameters) from the event loop; when event_fd is readable, answers()
returns the answers of everything asked so far, each kind in the order asked.
stop(), wait for serve() to return, then close().

A read that waits for no device, as every read of a record in memory
(tmpfs, ramfs: InlineReads.in_memory(path)), is better made where the answer
is wanted: InlineReads(path, summary_statements) answers lookup(ids) and
summary(statement, parameters) at once on the caller's thread, with no
thread to wake and no eventfd to wait for.
"""
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset
from posix.fcntl cimport O_DIRECTORY, O_RDONLY
from posix.unistd cimport close, read, write

from paycore.core.correlation_id cimport UUID_BYTES
from paycore.core.loop_threads cimport (
    EFD_CLOEXEC, EFD_NONBLOCK, eventfd, grow_array, pthread_cond_destroy, pthread_cond_init,
    pthread_cond_wait, pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock,
    pthread_mutex_unlock, raise_and_wake, unlock_and_wake,
)
from paycore.core.posix_files cimport on_memory_filesystem, open_or_raise, raise_os_error
from paycore.core.sqlite3_api cimport (
    SQLITE_DONE, SQLITE_MISMATCH, SQLITE_NOMEM, SQLITE_NULL, SQLITE_OK, SQLITE_OPEN_NOMUTEX,
    SQLITE_OPEN_READWRITE, SQLITE_PREPARE_PERSISTENT, SQLITE_ROW, SQLITE_STATIC, SQLITE_TOOBIG,
    sqlite3_bind_blob, sqlite3_bind_int64, sqlite3_bind_parameter_count, sqlite3_busy_timeout,
    sqlite3_close_v2, sqlite3_column_bytes, sqlite3_column_int, sqlite3_column_int64, sqlite3_column_text,
    sqlite3_column_type, sqlite3_errmsg, sqlite3_errstr, sqlite3_exec, sqlite3_finalize, sqlite3_open_v2,
    sqlite3_prepare_v3, sqlite3_reset, sqlite3_step,
)

import os


# The record's schema is record_sql.py's: payments_by_id makes a lookup one probe.
cdef const char* LOOKUP_SQL = (b"SELECT cents, processor, requested_at_ms FROM payments "
                               b"WHERE correlation_id = ?1")
# As long as the record's own connections wait for another instance's transaction.
cdef int BUSY_TIMEOUT_MS = 30000
cdef Py_ssize_t INITIAL_ANSWERS = 64
cdef Py_ssize_t INITIAL_SUMMARIES = 4
cdef Py_ssize_t INITIAL_INSTANCES = 4


cdef inline int answers_reserve(AnswerList* answers, Py_ssize_t wanted) noexcept nogil:
    """0, or -1 when memory is short."""
    return grow_array(<void**>&answers.items, &answers.capacity, wanted, sizeof(LookupAnswer), INITIAL_ANSWERS)


cdef inline int summaries_reserve(SummaryList* summaries, Py_ssize_t wanted) noexcept nogil:
    """0, or -1 when memory is short."""
    return grow_array(<void**>&summaries.items, &summaries.capacity, wanted, sizeof(SummaryAnswer),
                      INITIAL_SUMMARIES)


cdef class RecordReader:
    """A connection of its own to the record at `path`, which only reads.
    summary_statements: the SQL of each shape of summary, prepared once
    (record_sql.SUMMARY_STATEMENTS): rows of (NULL, processor, count,
    cents_low, cents_high) for the totals, then (instance, NULL,
    journal_seq, NULL, NULL) for every instance's committed sequence."""

    def __cinit__(self):
        pthread_mutex_init(&self.mutex, NULL)
        pthread_cond_init(&self.work_ready, NULL)
        self.event_fd = -1

    def __init__(self, str path, list summary_statements not None):
        self.path = path
        cdef int code = open_for_lookups(path, BUSY_TIMEOUT_MS, &self.db, &self.lookup_statement)
        if code == SQLITE_OK:
            code = prepare_summaries(self.db, summary_statements, &self.summaries)
        if code != SQLITE_OK:
            error = open_error(path, self.db, code)
            self._release()
            raise error
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
        free_committed(&self.summaries_answered)
        free(self.summaries_asked.items)
        free(self.summaries_answered.items)
        pthread_mutex_destroy(&self.mutex)
        pthread_cond_destroy(&self.work_ready)

    def _release(self):
        if self.lookup_statement != NULL:
            sqlite3_finalize(self.lookup_statement)
            self.lookup_statement = NULL
        finalize_summaries(&self.summaries)
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
            check_correlation_id(correlation_id)
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

    def ask_summary(self, int statement, list parameters not None) -> None:
        """Run summary statement number `statement` with these integer
        parameters (as many as it has), after every summary asked before."""
        cdef SummaryAnswer item
        ask_summary(&self.summaries, statement, parameters, &item)
        pthread_mutex_lock(&self.mutex)
        if (summaries_reserve(&self.summaries_asked, self.summaries_asked.count + 1) != 0
                or summaries_reserve(&self.summaries_answered, self.summaries_unread + 1) != 0):
            pthread_mutex_unlock(&self.mutex)
            raise MemoryError("record summaries")
        self.summaries_asked.items[self.summaries_asked.count] = item
        self.summaries_asked.count += 1
        self.summaries_unread += 1
        unlock_and_wake(&self.mutex, &self.work_ready)

    def answers(self) -> tuple:
        """The answers since the last call, each kind in the order asked:
        lookups, (correlation_id, status, cents, processor, requested_at_ms,
        error) per id; summaries, (error, totals, committed) per summary,
        totals (default count, default cents, fallback count, fallback cents)
        and committed {instance: journal sequence}, or error SQLite's result
        code (then nothing else)."""
        cdef uint64_t counter
        cdef Py_ssize_t index
        cdef LookupAnswer* item
        cdef SummaryAnswer* summary
        read(self.event_fd, &counter, sizeof(counter))
        lookups = []
        summaries = []
        # The thread never takes the GIL: holding both here cannot deadlock.
        pthread_mutex_lock(&self.mutex)
        try:
            for index in range(self.answered.count):
                item = &self.answered.items[index]
                lookups.append(lookup_tuple(item.uuid[:UUID_BYTES], item))
            for index in range(self.summaries_answered.count):
                summary = &self.summaries_answered.items[index]
                summaries.append(summary_tuple(summary))
        finally:
            self.unread -= self.answered.count
            self.answered.count = 0
            free_committed(&self.summaries_answered)
            self.summaries_unread -= self.summaries_answered.count
            self.summaries_answered.count = 0
            pthread_mutex_unlock(&self.mutex)
        return lookups, summaries

    def serve(self) -> None:
        """The reader: run in a thread of its own until stop() (at once if
        stop() came first), after answering everything asked before it."""
        # With the GIL: the thread that holds the mutex never waits for it.
        pthread_mutex_lock(&self.mutex)
        refused = self.serving or self.lookup_statement == NULL
        if not refused:
            self.serving = True
        pthread_mutex_unlock(&self.mutex)
        if refused:
            raise RuntimeError("the reader is already served, or closed")
        with nogil:
            self.serve_raw()

    cdef void serve_raw(self) noexcept nogil:
        cdef AnswerList batch
        cdef SummaryList summaries
        cdef Py_ssize_t index
        cdef uint64_t one = 1
        batch.items = NULL
        batch.count = batch.capacity = 0
        summaries.items = NULL
        summaries.count = summaries.capacity = 0
        pthread_mutex_lock(&self.mutex)
        while True:
            while self.asked.count == 0 and self.summaries_asked.count == 0 and not self.closing:
                pthread_cond_wait(&self.work_ready, &self.mutex)
            if self.asked.count == 0 and self.summaries_asked.count == 0:
                break
            batch, self.asked = self.asked, batch
            summaries, self.summaries_asked = self.summaries_asked, summaries
            pthread_mutex_unlock(&self.mutex)
            for index in range(batch.count):
                look_up(self.lookup_statement, &batch.items[index])
            for index in range(summaries.count):
                summarize(&self.summaries, &summaries.items[index])
            pthread_mutex_lock(&self.mutex)
            if self.answered.count == 0 and self.summaries_answered.count == 0:
                write(self.event_fd, &one, sizeof(one))
            # ask() and ask_summary() made room for everything not yet read.
            memcpy(&self.answered.items[self.answered.count], batch.items, batch.count * sizeof(LookupAnswer))
            self.answered.count += batch.count
            batch.count = 0
            memcpy(&self.summaries_answered.items[self.summaries_answered.count], summaries.items,
                   summaries.count * sizeof(SummaryAnswer))
            self.summaries_answered.count += summaries.count
            summaries.count = 0
        self.serving = False
        pthread_mutex_unlock(&self.mutex)
        free(batch.items)
        free(summaries.items)

    def stop(self) -> None:
        """Ask serve() to answer what was asked and return."""
        with nogil:
            raise_and_wake(&self.mutex, &self.work_ready, &self.closing)

    def close(self) -> None:
        """Close the connection once serve() has returned (or never ran)."""
        if self.serving:
            raise RuntimeError("the reader still runs: stop() it and wait for serve() to return")
        self._release()


cdef int prepare_summaries(sqlite3* db, list sql, SummaryStatements* summaries) except -1:
    """Prepares each statement of sql on db: 0 or SQLite's result code (those
    prepared stay in summaries, for finalize_summaries)."""
    if not sql:
        return SQLITE_OK
    summaries.statements = <sqlite3_stmt**>calloc(len(sql), sizeof(sqlite3_stmt*))
    if summaries.statements == NULL:
        raise MemoryError("record summaries")
    cdef bytes encoded
    cdef int code
    for text in sql:
        encoded = text.encode()
        code = sqlite3_prepare_v3(db, encoded, -1, SQLITE_PREPARE_PERSISTENT,
                                  &summaries.statements[summaries.count], NULL)
        if code != SQLITE_OK:
            return code
        summaries.count += 1
    return SQLITE_OK


cdef void finalize_summaries(SummaryStatements* summaries) noexcept nogil:
    while summaries.count > 0:
        summaries.count -= 1
        sqlite3_finalize(summaries.statements[summaries.count])
    free(summaries.statements)
    summaries.statements = NULL


cdef int ask_summary(const SummaryStatements* summaries, int statement, list parameters,
                     SummaryAnswer* item) except -1:
    """Fills item with what summarize needs to run statement with parameters,
    after checking that the statement exists and takes that many."""
    if parameters is None:
        raise TypeError("summary parameters: a list of integers")
    if not 0 <= statement < summaries.count:
        raise ValueError(f"no summary statement {statement}")
    cdef int count = len(parameters)
    cdef int expected = sqlite3_bind_parameter_count(summaries.statements[statement])
    if count != expected or count > MAX_SUMMARY_PARAMETERS:
        raise ValueError(f"summary statement {statement} takes {expected} parameters"
                         f" (at most {MAX_SUMMARY_PARAMETERS}), not {count}")
    memset(item, 0, sizeof(SummaryAnswer))
    item.statement = statement
    item.parameter_count = count
    cdef int index
    for index in range(count):
        item.parameters[index] = parameters[index]
    return 0


cdef void summarize(const SummaryStatements* summaries, SummaryAnswer* item) noexcept nogil:
    """Runs the statement item asks for with its parameters: sets its answer."""
    cdef sqlite3_stmt* statement = summaries.statements[item.statement]
    cdef int code = SQLITE_OK
    cdef int index, processor, length
    cdef Py_ssize_t capacity = 0
    cdef CommittedSeq* seq
    for index in range(item.parameter_count):
        if code == SQLITE_OK:
            code = sqlite3_bind_int64(statement, index + 1, item.parameters[index])
    while code == SQLITE_OK or code == SQLITE_ROW:
        code = sqlite3_step(statement)
        if code != SQLITE_ROW:
            break
        if sqlite3_column_type(statement, 0) == SQLITE_NULL:
            processor = sqlite3_column_int(statement, 1)
            if not 0 <= processor < PROCESSORS:
                code = SQLITE_MISMATCH
                break
            item.count[processor] = sqlite3_column_int64(statement, 2)
            item.cents_low[processor] = sqlite3_column_int64(statement, 3)
            item.cents_high[processor] = sqlite3_column_int64(statement, 4)
            continue
        length = sqlite3_column_bytes(statement, 0)
        if length > INSTANCE_NAME_MAX:
            code = SQLITE_TOOBIG
            break
        if grow_array(<void**>&item.committed, &capacity, item.committed_count + 1,
                      sizeof(CommittedSeq), INITIAL_INSTANCES) != 0:
            code = SQLITE_NOMEM
            break
        seq = &item.committed[item.committed_count]
        memcpy(seq.instance, sqlite3_column_text(statement, 0), length)
        seq.instance[length] = 0
        seq.journal_seq = sqlite3_column_int64(statement, 2)
        item.committed_count += 1
    item.error = 0 if code == SQLITE_DONE else code
    if item.error != 0:
        free(item.committed)
        item.committed = NULL
        item.committed_count = 0
    sqlite3_reset(statement)


cdef inline int check_correlation_id(bytes correlation_id) except -1:
    if correlation_id is None or len(correlation_id) != UUID_BYTES:
        raise ValueError("a correlationId is 16 bytes")
    return 0


cdef int open_for_lookups(str path, int busy_timeout_ms, sqlite3** db, sqlite3_stmt** statement):
    """A read-only connection to the record at path and its prepared lookup:
    SQLite's result code (db may be set even when it is not SQLITE_OK)."""
    cdef bytes encoded = path.encode()
    cdef int code = sqlite3_open_v2(encoded, db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL)
    if code == SQLITE_OK:
        sqlite3_busy_timeout(db[0], busy_timeout_ms)
        code = sqlite3_exec(db[0], b"PRAGMA query_only = 1", NULL, NULL, NULL)
    if code == SQLITE_OK:
        code = sqlite3_prepare_v3(db[0], LOOKUP_SQL, -1, SQLITE_PREPARE_PERSISTENT, statement, NULL)
    return code


cdef object open_error(str path, sqlite3* db, int code):
    cdef const char* message = sqlite3_errmsg(db) if db != NULL else sqlite3_errstr(code)
    return OSError(f"payments record {path}: {message.decode(errors='replace')}")


cdef void look_up(sqlite3_stmt* statement, LookupAnswer* item) noexcept nogil:
    """Sets every field but uuid: what the record holds for it (zeros unless FOUND)."""
    item.cents = item.requested_at_ms = 0
    item.processor = 0
    cdef int code = sqlite3_bind_blob(statement, 1, item.uuid, UUID_BYTES, SQLITE_STATIC)
    if code == SQLITE_OK:
        code = sqlite3_step(statement)
    if code == SQLITE_ROW:
        item.status = FOUND
        item.cents = sqlite3_column_int64(statement, 0)
        item.processor = sqlite3_column_int(statement, 1)
        item.requested_at_ms = sqlite3_column_int64(statement, 2)
        item.error = 0
    elif code == SQLITE_DONE:
        item.status = ABSENT
        item.error = 0
    else:
        item.status = FAILED
        item.error = code
    sqlite3_reset(statement)


cdef class InlineReads:
    """Lookups and summaries of the record at `path` answered at once, on
    the caller's thread, through a read-only connection of its own: for
    reads that wait for no device, as every read of a record in memory
    (in_memory(path)). Nor do they wait for a lock: where another connection
    holds one (SQLITE_BUSY), the answer is FAILED (a lookup) or the error (a
    summary) at once instead of after a wait, and the caller asks
    RecordReader instead."""

    @staticmethod
    def in_memory(str path) -> bool:
        """The record at path is in memory (its directory is on tmpfs or ramfs)."""
        directory = os.path.dirname(path) or "."
        cdef int fd = open_or_raise(directory, O_RDONLY | O_DIRECTORY, 0)
        try:
            return on_memory_filesystem(fd, directory)
        finally:
            close(fd)

    def __init__(self, str path, list summary_statements not None):
        self.path = path
        cdef int code = open_for_lookups(path, 0, &self.db, &self.lookup_statement)
        if code == SQLITE_OK:
            code = prepare_summaries(self.db, summary_statements, &self.summaries)
        if code != SQLITE_OK:
            error = open_error(path, self.db, code)
            self.close()
            raise error

    def __dealloc__(self):
        self.close()

    def lookup(self, list correlation_ids not None) -> list:
        """(correlation_id, status, cents, processor, requested_at_ms, error)
        per id, as RecordReader.answers() gives them."""
        self._check_open()
        cdef LookupAnswer item
        cdef bytes correlation_id
        answers = []
        for correlation_id in correlation_ids:
            check_correlation_id(correlation_id)
            memcpy(item.uuid, <const char*>correlation_id, UUID_BYTES)
            look_up(self.lookup_statement, &item)
            answers.append(lookup_tuple(correlation_id, &item))
        return answers

    def summary(self, int statement, list parameters) -> tuple:
        """(error, totals, committed) of summary statement number `statement`
        with these parameters, as RecordReader.answers() gives a summary."""
        self._check_open()
        cdef SummaryAnswer item
        ask_summary(&self.summaries, statement, parameters, &item)
        summarize(&self.summaries, &item)
        try:
            return summary_tuple(&item)
        finally:
            free(item.committed)

    def _check_open(self):
        if self.lookup_statement == NULL:
            raise RuntimeError(f"payments record {self.path}: the inline reads are closed")

    def close(self) -> None:
        if self.lookup_statement != NULL:
            sqlite3_finalize(self.lookup_statement)
            self.lookup_statement = NULL
        finalize_summaries(&self.summaries)
        if self.db != NULL:
            sqlite3_close_v2(self.db)
            self.db = NULL


cdef inline tuple lookup_tuple(bytes correlation_id, const LookupAnswer* item):
    return correlation_id, item.status, item.cents, item.processor, item.requested_at_ms, item.error


cdef tuple summary_tuple(const SummaryAnswer* summary):
    if summary.error != 0:
        return summary.error, None, None
    cdef Py_ssize_t index
    committed = {}
    for index in range(summary.committed_count):
        committed[summary.committed[index].instance.decode(errors="replace")] = summary.committed[index].journal_seq
    # Cents are summed in two int64 parts so no sum wraps: put together here, exactly.
    totals = (summary.count[0], (<object>summary.cents_high[0] << 32) + summary.cents_low[0],
              summary.count[1], (<object>summary.cents_high[1] << 32) + summary.cents_low[1])
    return 0, totals, committed


cdef void free_committed(SummaryList* summaries) noexcept nogil:
    cdef Py_ssize_t index
    for index in range(summaries.count):
        free(summaries.items[index].committed)
        summaries.items[index].committed = NULL
