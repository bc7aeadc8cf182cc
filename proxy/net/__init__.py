"""The network edge: listening sockets, accept loops, upstream connects, L4 forwarding."""
