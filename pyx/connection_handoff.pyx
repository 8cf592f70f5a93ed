"""Client connections handed from the load balancer to an instance: each one's
file descriptor crosses a unix SOCK_SEQPACKET socket (SCM_RIGHTS) in a
message of its own, and the sender closes its copy. Both ends are here, and
the balancer's loop itself (accept, hand over, close), which runs in C with
the GIL released: a new connection costs no Python, however cold that path is."""
import os

from libc.errno cimport EAGAIN, ECONNABORTED, EINTR, errno
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from posix.unistd cimport close

from cpython.exc cimport PyErr_CheckSignals


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    cmsghdr* CMSG_FIRSTHDR(msghdr* message)
    cmsghdr* CMSG_NXTHDR(msghdr* message, cmsghdr* header)
    unsigned char* CMSG_DATA(cmsghdr* header)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)
    enum:
        SOL_SOCKET
        SCM_RIGHTS
        MSG_DONTWAIT
        MSG_NOSIGNAL
        MSG_CMSG_CLOEXEC
        SOCK_CLOEXEC
    ssize_t sendmsg(int fd, const msghdr* message, int flags)
    ssize_t recvmsg(int fd, msghdr* message, int flags)
    int accept4(int fd, void* address, socklen_t* address_length, int flags)


cdef enum:
    # Room for one descriptor's control message (CMSG_SPACE(sizeof(int)) is 24 on Linux).
    CONTROL_BYTES = 64

# The message itself: the descriptor rides on it.
cdef char MESSAGE_BYTE = b"c"

cdef union ControlBuffer:
    cmsghdr aligned
    char space[CONTROL_BYTES]


cdef inline void prepare(msghdr* message, iovec* data, char* byte, ControlBuffer* control) noexcept nogil:
    memset(message, 0, sizeof(msghdr))
    data.iov_base = byte
    data.iov_len = 1
    message.msg_iov = data
    message.msg_iovlen = 1
    message.msg_control = control.space
    message.msg_controllen = CMSG_SPACE(sizeof(int))


cdef int send_connection_fd(int channel_fd, int connection_fd) noexcept nogil:
    cdef msghdr message
    cdef iovec data
    cdef char byte = MESSAGE_BYTE
    cdef ControlBuffer control
    memset(&control, 0, sizeof(ControlBuffer))
    prepare(&message, &data, &byte, &control)
    cdef cmsghdr* header = CMSG_FIRSTHDR(&message)
    header.cmsg_level = SOL_SOCKET
    header.cmsg_type = SCM_RIGHTS
    header.cmsg_len = CMSG_LEN(sizeof(int))
    memcpy(CMSG_DATA(header), &connection_fd, sizeof(int))
    while True:
        if sendmsg(channel_fd, &message, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0:
            return 0
        if errno != EINTR:
            return errno


cdef int receive_connection_fd(int channel_fd, int* fd_out, bint* closed_out) noexcept nogil:
    cdef msghdr message
    cdef iovec data
    cdef char byte
    cdef ControlBuffer control
    cdef cmsghdr* header
    cdef ssize_t received
    prepare(&message, &data, &byte, &control)
    fd_out[0] = -1
    closed_out[0] = False
    while True:
        received = recvmsg(channel_fd, &message, MSG_DONTWAIT | MSG_CMSG_CLOEXEC)
        if received >= 0:
            break
        if errno != EINTR:
            return errno
    header = CMSG_FIRSTHDR(&message)
    while header != NULL:
        if (header.cmsg_level == SOL_SOCKET and header.cmsg_type == SCM_RIGHTS
                and header.cmsg_len >= CMSG_LEN(sizeof(int))):
            memcpy(fd_out, CMSG_DATA(header), sizeof(int))
        header = CMSG_NXTHDR(&message, header)
    # A message always carries its byte: none means the sender hung up.
    closed_out[0] = received == 0 and fd_out[0] < 0
    return 0


cdef object os_error(int error):
    return OSError(error, os.strerror(error))


def send_connection(int channel_fd, int connection_fd):
    """Hand one connection over; the caller still closes its own copy. OSError
    if the instance cannot take it (BlockingIOError: its queue is full)."""
    cdef int error = send_connection_fd(channel_fd, connection_fd)
    if error:
        raise os_error(error)


def receive_connections(int channel_fd):
    """(descriptors of every connection waiting on the channel, whether the
    sender hung up). They are the caller's to serve and close."""
    cdef int fd
    cdef bint closed = False
    cdef int error
    fds = []
    while not closed:
        error = receive_connection_fd(channel_fd, &fd, &closed)
        if error == EAGAIN:
            break
        if error:
            for taken in fds:
                close(taken)
            raise os_error(error)
        if fd >= 0:
            fds.append(fd)
    return fds, closed


def hand_off_connections(int listener_fd, channel_fds, Py_ssize_t next_channel):
    """The balancer's loop: accept each client connection on the (blocking)
    listener, hand it to the channels round robin starting at next_channel,
    close it; until a connection or the listener needs the caller. Returns
    (next_channel, connection_fd, failed_channel, error):

    - connection_fd -1: accepting failed with errno error (EINTR: a signal arrived);
    - otherwise the connection, still open, was not handed over: the channel
      at failed_channel failed with error, or (failed_channel -1, error
      EAGAIN) every channel was full.
    """
    cdef Py_ssize_t count = len(channel_fds)
    if count == 0:
        raise ValueError("no channel to hand connections to")
    cdef int* channels = <int*>malloc(count * sizeof(int))
    if channels == NULL:
        raise MemoryError()
    cdef Py_ssize_t index
    for index in range(count):
        channels[index] = channel_fds[index]
    cdef Py_ssize_t step
    cdef Py_ssize_t failed = -1
    cdef int connection_fd
    cdef int error = 0
    next_channel %= count
    with nogil:
        while True:
            connection_fd = accept4(listener_fd, NULL, NULL, SOCK_CLOEXEC)
            if connection_fd < 0:
                error = errno
                if error == ECONNABORTED:
                    continue  # the client gave up before it was accepted
                break
            failed = -1
            for step in range(count):
                index = (next_channel + step) % count
                error = send_connection_fd(channels[index], connection_fd)
                if error == 0 or error != EAGAIN:
                    break
            if error == 0:
                close(connection_fd)
                next_channel = (index + 1) % count
                continue
            if error != EAGAIN:
                failed = index
            break
    free(channels)
    if connection_fd < 0 and error == EINTR:
        PyErr_CheckSignals()  # a handler that raises (SIGTERM's) raises here
    return next_channel, connection_fd, failed, error
