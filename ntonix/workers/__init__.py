"""Several gateway processes on one machine: a supervising parent that owns
the listening sockets and the admin listener, and worker processes that
adopt the sockets and serve the traffic."""
