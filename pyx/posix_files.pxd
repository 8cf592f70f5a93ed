# Opening and locking files, raising OSError the Python way, and telling a
# file system in memory from a device, for the core modules that work on files
# through POSIX calls (journal, record_reader, the shared-memory files). Inline:
# no module of its own.
from cpython.exc cimport PyErr_SetFromErrnoWithFilenameObject
from libc.string cimport memset
from posix.fcntl cimport O_CLOEXEC, SEEK_SET, fcntl, flock
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


cdef extern from "<sys/vfs.h>" nogil:
    struct statfs:
        long f_type
    int fstatfs(int fd, statfs* buffer)


cdef extern from *:
    """
    /* File systems whose reads and writes are copies in memory: tmpfs, ramfs. */
    #define POSIX_FILES_TMPFS_MAGIC 0x01021994L
    #define POSIX_FILES_RAMFS_MAGIC 0x858458f6L
    """
    long TMPFS_MAGIC "POSIX_FILES_TMPFS_MAGIC"
    long RAMFS_MAGIC "POSIX_FILES_RAMFS_MAGIC"


cdef inline bint on_memory_filesystem(int fd, str path) except -1:
    """The file system of fd (named path in an error) is tmpfs or ramfs: no
    read or write on it ever waits for a device."""
    cdef statfs filesystem
    if fstatfs(fd, &filesystem) != 0:
        raise_os_error(path)
    return filesystem.f_type == TMPFS_MAGIC or filesystem.f_type == RAMFS_MAGIC


cdef extern from "<fcntl.h>" nogil:
    # Open-file-description locks: held per open file, released when the owner dies.
    enum: F_OFD_SETLK
    enum: F_OFD_SETLKW


cdef inline int lock_file(int fd, short lock_type, bint wait) noexcept nogil:
    """Take (F_WRLCK, F_RDLCK) or drop (F_UNLCK) an open-file-description
    lock on the whole file: 0, or -1 with errno (EAGAIN: held, without wait)."""
    cdef flock request
    memset(&request, 0, sizeof(flock))
    request.l_type = lock_type
    request.l_whence = SEEK_SET
    return fcntl(fd, F_OFD_SETLKW if wait else F_OFD_SETLK, &request)
