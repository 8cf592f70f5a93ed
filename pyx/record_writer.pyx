# cython: language_level=3
"""The payments record's commits without the GIL (see the .pxd).

Use: RecordWriter(path, setup, statements, busy_timeout_ms) once the
record's schema exists (record_sql.connect_writer makes it); commit(instance,
settlements, through_seq) on one thread at a time; close().
"""
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, strncpy

from paycore.core.sqlite3_api cimport (
    SQLITE_DONE, SQLITE_NOMEM, SQLITE_OK, SQLITE_OPEN_NOMUTEX, SQLITE_OPEN_READWRITE,
    SQLITE_PREPARE_PERSISTENT, SQLITE_ROW, SQLITE_STATIC, sqlite3_bind_blob, sqlite3_bind_int64,
    sqlite3_bind_parameter_count, sqlite3_bind_text, sqlite3_busy_timeout, sqlite3_close_v2, sqlite3_column_int64, sqlite3_errmsg,
    sqlite3_errstr, sqlite3_exec, sqlite3_finalize, sqlite3_get_autocommit, sqlite3_open_v2,
    sqlite3_prepare_v3, sqlite3_reset, sqlite3_step,
)

import sqlite3 as python_sqlite3

cdef class RecordWriter:
    """Commits settlements into the record at `path` on a connection of its
    own. setup: a script run once on it (pragmas, the TEMP table and trigger
    that collect what a transaction inserts); statements: the SQL of every
    step from INSERT_PAYMENT to ADVANCE_COMMITTED, in that order."""

    def __cinit__(self):
        cdef int index
        self.db = NULL
        self.failure[0] = 0
        for index in range(COMMIT_STEPS):
            self.steps[index] = NULL

    def __init__(self, str path, str setup, statements, int busy_timeout_ms):
        if len(statements) != ADVANCE_COMMITTED - INSERT_PAYMENT + 1:
            raise ValueError(f"{ADVANCE_COMMITTED - INSERT_PAYMENT + 1} statements expected, not {len(statements)}")
        self.path = path
        cdef bytes encoded = path.encode()
        cdef int code = sqlite3_open_v2(encoded, &self.db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL)
        if code == SQLITE_OK:
            sqlite3_busy_timeout(self.db, busy_timeout_ms)
            code = sqlite3_exec(self.db, setup.encode(), NULL, NULL, NULL)
        sql = [b"BEGIN IMMEDIATE", *(statement.encode() for statement in statements), b"COMMIT", b"ROLLBACK"]
        cdef int step = 0
        while code == SQLITE_OK and step < COMMIT_STEPS:
            code = sqlite3_prepare_v3(self.db, sql[step], -1, SQLITE_PREPARE_PERSISTENT, &self.steps[step], NULL)
            step += 1
        if code != SQLITE_OK:
            error = self._error(code, sqlite3_errmsg(self.db) if self.db != NULL else sqlite3_errstr(code))
            self.close()
            raise error
        parameters = sqlite3_bind_parameter_count(self.steps[INSERT_PAYMENTS])
        if (sqlite3_bind_parameter_count(self.steps[INSERT_PAYMENT]) != COLUMNS_PER_ROW
                or parameters % COLUMNS_PER_ROW or not parameters):
            self.close()
            raise ValueError(f"the inserts bind {COLUMNS_PER_ROW} parameters per payment")
        self.rows_per_insert = parameters // COLUMNS_PER_ROW

    def __dealloc__(self):
        self.close()

    def commit(self, str instance, settlements, int64_t through_seq):
        """One transaction: the settlements (records with correlationId's 16
        bytes, cents, processor, requested_at_ms and generation at indexes 0
        to 4) whose correlationId is new, their buckets, and instance's
        committed journal sequence raised to through_seq. None when every
        settlement was inserted, else the rows it inserted as (cents,
        processor, requested_at_ms, generation). sqlite3.OperationalError if
        the transaction failed: then nothing of it is in the record."""
        if self.db == NULL:
            raise ValueError("the record writer is closed")
        cdef Py_ssize_t count = len(settlements)
        cdef SettlementRow* rows = <SettlementRow*>malloc(max(count, 1) * sizeof(SettlementRow))
        if rows == NULL:
            raise MemoryError("settlement rows")
        cdef bytes instance_text = instance.encode()
        cdef const char* instance_pointer = instance_text
        cdef int instance_bytes = len(instance_text)
        cdef FreshRow* fresh = NULL
        cdef Py_ssize_t fresh_count = -1
        cdef Py_ssize_t index
        cdef bytes correlation_id
        cdef int code
        try:
            for index, settlement in enumerate(settlements):
                correlation_id = settlement[0]
                if len(correlation_id) != UUID_BYTES:
                    raise ValueError(f"a correlationId is {UUID_BYTES} bytes, not {len(correlation_id)}")
                memcpy(rows[index].correlation_id, <const char*>correlation_id, UUID_BYTES)
                rows[index].cents = settlement[1]
                rows[index].processor = settlement[2]
                rows[index].requested_at_ms = settlement[3]
                rows[index].generation = settlement[4]
            with nogil:
                code = self._commit(rows, count, instance_pointer, instance_bytes, through_seq, &fresh,
                                    &fresh_count)
            if code != SQLITE_OK:
                raise self._error(code, self.failure)
            if fresh_count == count:
                return None
            return [(fresh[index].cents, fresh[index].processor, fresh[index].requested_at_ms,
                     fresh[index].generation) for index in range(fresh_count)]
        finally:
            free(rows)
            free(fresh)

    def close(self) -> None:
        cdef int index
        for index in range(COMMIT_STEPS):
            if self.steps[index] != NULL:
                sqlite3_finalize(self.steps[index])
                self.steps[index] = NULL
        if self.db != NULL:
            sqlite3_close_v2(self.db)
            self.db = NULL

    cdef object _error(self, int code, const char* message):
        return python_sqlite3.OperationalError(
            f"payments record {self.path}: {message.decode(errors='replace')} (SQLite result {code})")

    cdef int _roll_back(self, int code) noexcept nogil:
        """Keep what SQLite said of the failure, end the transaction, and pass code on."""
        strncpy(self.failure, sqlite3_errmsg(self.db), FAILURE_BYTES - 1)
        self.failure[FAILURE_BYTES - 1] = 0
        if not sqlite3_get_autocommit(self.db):
            self._step(ROLLBACK)
        return code

    cdef int _insert(self, int step, const SettlementRow* rows, int count) noexcept nogil:
        """Bind count payments to an INSERT and run it: SQLITE_OK or the error."""
        cdef sqlite3_stmt* statement = self.steps[step]
        cdef int code = SQLITE_OK
        cdef int row = 0
        cdef int first
        while code == SQLITE_OK and row < count:
            first = row * COLUMNS_PER_ROW
            code = sqlite3_bind_blob(statement, first + 1, rows[row].correlation_id, UUID_BYTES, SQLITE_STATIC)
            if code == SQLITE_OK:
                code = sqlite3_bind_int64(statement, first + 2, rows[row].cents)
            if code == SQLITE_OK:
                code = sqlite3_bind_int64(statement, first + 3, rows[row].processor)
            if code == SQLITE_OK:
                code = sqlite3_bind_int64(statement, first + 4, rows[row].requested_at_ms)
            if code == SQLITE_OK:
                code = sqlite3_bind_int64(statement, first + 5, rows[row].generation)
            row += 1
        return self._step(step) if code == SQLITE_OK else code

    cdef int _step(self, int step) noexcept nogil:
        """Run a statement that returns no rows: SQLITE_OK or the error."""
        cdef int code = sqlite3_step(self.steps[step])
        sqlite3_reset(self.steps[step])
        return SQLITE_OK if code == SQLITE_DONE else code

    cdef int _commit(self, const SettlementRow* rows, Py_ssize_t count, const char* instance,
                     int instance_bytes, int64_t through_seq, FreshRow** fresh,
                     Py_ssize_t* fresh_count) noexcept nogil:
        """SQLITE_OK, fresh_count set (and *fresh, a malloc'd array, when it
        is less than count); or the failed step's code, rolled back."""
        cdef sqlite3_stmt* statement
        cdef Py_ssize_t index
        cdef int code = self._step(BEGIN_IMMEDIATE)
        if code != SQLITE_OK:
            return self._roll_back(code)
        index = 0
        while code == SQLITE_OK and count - index >= self.rows_per_insert:
            code = self._insert(INSERT_PAYMENTS, rows + index, self.rows_per_insert)
            index += self.rows_per_insert
        while code == SQLITE_OK and index < count:
            code = self._insert(INSERT_PAYMENT, rows + index, 1)
            index += 1
        if code != SQLITE_OK:
            return self._roll_back(code)
        statement = self.steps[COUNT_FRESH]
        code = sqlite3_step(statement)
        if code == SQLITE_ROW:
            fresh_count[0] = sqlite3_column_int64(statement, 0)
            code = SQLITE_OK
        sqlite3_reset(statement)
        if code != SQLITE_OK:
            return self._roll_back(code)
        if fresh_count[0] != count:
            statement = self.steps[FRESH_ROWS]
            fresh[0] = <FreshRow*>malloc(max(fresh_count[0], 1) * sizeof(FreshRow))
            if fresh[0] == NULL:
                return self._roll_back(SQLITE_NOMEM)
            index = 0
            code = sqlite3_step(statement)
            while code == SQLITE_ROW and index < fresh_count[0]:
                fresh[0][index].cents = sqlite3_column_int64(statement, 0)
                fresh[0][index].processor = sqlite3_column_int64(statement, 1)
                fresh[0][index].requested_at_ms = sqlite3_column_int64(statement, 2)
                fresh[0][index].generation = sqlite3_column_int64(statement, 3)
                index += 1
                code = sqlite3_step(statement)
            sqlite3_reset(statement)
            if code != SQLITE_DONE and code != SQLITE_ROW:
                return self._roll_back(code)
            fresh_count[0] = index
        code = self._step(ADD_FRESH_TO_BUCKETS)
        if code == SQLITE_OK:
            code = self._step(FORGET_FRESH)
        if code == SQLITE_OK:
            statement = self.steps[ADVANCE_COMMITTED]
            code = sqlite3_bind_text(statement, 1, instance, instance_bytes, SQLITE_STATIC)
            if code == SQLITE_OK:
                code = sqlite3_bind_int64(statement, 2, through_seq)
            if code == SQLITE_OK:
                code = self._step(ADVANCE_COMMITTED)
        if code == SQLITE_OK:
            code = self._step(COMMIT)
        if code != SQLITE_OK:
            return self._roll_back(code)
        return SQLITE_OK
