# Opening files and raising OSError the Python way, for the core modules that
# work on files through POSIX calls (ledger, journal). Inline: no module of its own.
from cpython.exc cimport PyErr_SetFromErrnoWithFilenameObject
from posix.fcntl cimport O_CLOEXEC
from posix.fcntl cimport open as open_file


cdef extern from "Python.h":
    bytes PyUnicode_EncodeFSDefault(str text)


cdef inline int raise_os_error(str path) except -1:
    """OSError from errno, naming path."""
    PyErr_SetFromErrnoWithFilenameObject(OSError, path)
    return -1


cdef inline int open_or_raise(str path, int flags, int mode) except -1:
    cdef bytes encoded = PyUnicode_EncodeFSDefault(path)
    cdef int fd = open_file(encoded, flags | O_CLOEXEC, mode)
    if fd < 0:
        raise_os_error(path)
    return fd
