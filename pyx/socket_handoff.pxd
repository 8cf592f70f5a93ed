# Sockets passed from the load balancer to an instance as file descriptors
# (SCM_RIGHTS) over a unix SOCK_SEQPACKET socket, one per message.

# Both return 0 or an errno value.
cdef int send_socket_fd(int channel_fd, int socket_fd) noexcept nogil
# One message's descriptor into fd_out (-1 if it carried none); closed_out set
# when the sender hung up.
cdef int receive_socket_fd(int channel_fd, int* fd_out, bint* closed_out) noexcept nogil
