# SQLite's C API as the payments record's compiled modules call it (the
# library Python's sqlite3 module loads: setup.py links them to it).
cdef extern from "sqlite3.h" nogil:
    ctypedef struct sqlite3:
        pass
    ctypedef struct sqlite3_stmt:
        pass
    enum:
        SQLITE_OK
        SQLITE_ROW
        SQLITE_DONE
        SQLITE_FULL
        SQLITE_NOMEM
        SQLITE_MISMATCH
        SQLITE_TOOBIG
        SQLITE_NULL
        SQLITE_OPEN_READONLY
        SQLITE_OPEN_READWRITE
        SQLITE_OPEN_NOMUTEX
        SQLITE_PREPARE_PERSISTENT
    ctypedef void (*sqlite3_destructor_type)(void*)
    sqlite3_destructor_type SQLITE_STATIC
    int sqlite3_open_v2(const char* filename, sqlite3** db, int flags, const char* vfs)
    int sqlite3_close_v2(sqlite3* db)
    int sqlite3_busy_timeout(sqlite3* db, int milliseconds)
    int sqlite3_exec(sqlite3* db, const char* sql, void* callback, void* argument, char** error)
    int sqlite3_prepare_v2(sqlite3* db, const char* sql, int bytes, sqlite3_stmt** statement, const char** tail)
    int sqlite3_prepare_v3(sqlite3* db, const char* sql, int bytes, unsigned int flags,
                           sqlite3_stmt** statement, const char** tail)
    int sqlite3_bind_blob(sqlite3_stmt* statement, int index, const void* value, int bytes,
                          sqlite3_destructor_type destructor)
    int sqlite3_bind_int64(sqlite3_stmt* statement, int index, long long value)
    int sqlite3_bind_parameter_count(sqlite3_stmt* statement)
    int sqlite3_step(sqlite3_stmt* statement)
    int sqlite3_reset(sqlite3_stmt* statement)
    int sqlite3_finalize(sqlite3_stmt* statement)
    int sqlite3_column_int(sqlite3_stmt* statement, int column)
    long long sqlite3_column_int64(sqlite3_stmt* statement, int column)
    int sqlite3_column_type(sqlite3_stmt* statement, int column)
    const unsigned char* sqlite3_column_text(sqlite3_stmt* statement, int column)
    int sqlite3_column_bytes(sqlite3_stmt* statement, int column)
    const char* sqlite3_errmsg(sqlite3* db)
    const char* sqlite3_errstr(int code)
