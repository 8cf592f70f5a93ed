"""The load balancer's listening sockets, handed to the instances: a file
descriptor crosses a unix SOCK_SEQPACKET socket (SCM_RIGHTS) in a message of
its own. Both ends are here, and the accept an instance makes on a socket it
was handed: one connection at a time."""
import os

from libc.errno cimport EAGAIN, ECONNABORTED, EINTR, errno
from libc.string cimport memcpy, memset
from posix.unistd cimport close


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
        SOCK_NONBLOCK
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


cdef int send_socket_fd(int channel_fd, int socket_fd) noexcept nogil:
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
    memcpy(CMSG_DATA(header), &socket_fd, sizeof(int))
    while True:
        if sendmsg(channel_fd, &message, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0:
            return 0
        if errno != EINTR:
            return errno


cdef int receive_socket_fd(int channel_fd, int* fd_out, bint* closed_out) noexcept nogil:
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


def send_socket(int channel_fd, int socket_fd):
    """Hand a socket over; the caller keeps its own copy. OSError if the
    other end cannot take it (BlockingIOError: its queue is full)."""
    cdef int error = send_socket_fd(channel_fd, socket_fd)
    if error:
        raise os_error(error)


def receive_sockets(int channel_fd):
    """(descriptors of every socket waiting on the channel, whether the sender
    hung up). They are the caller's to use and close."""
    cdef int fd
    cdef bint closed = False
    cdef int error
    fds = []
    while not closed:
        error = receive_socket_fd(channel_fd, &fd, &closed)
        if error == EAGAIN:
            break
        if error:
            for taken in fds:
                close(taken)
            raise os_error(error)
        if fd >= 0:
            fds.append(fd)
    return fds, closed


def accept_connection(int listener_fd):
    """One client connection from a non-blocking listener (non-blocking
    itself), or -1 when none is waiting (another instance holding the same
    socket for a moment may have taken it)."""
    cdef int fd
    while True:
        fd = accept4(listener_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK)
        if fd >= 0:
            return fd
        if errno == EAGAIN:
            return -1
        if errno != EINTR and errno != ECONNABORTED:  # ECONNABORTED: that client gave up
            raise os_error(errno)
