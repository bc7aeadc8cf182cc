"""Black-box tests: meshproxy as real processes, real sockets on 127.0.0.1."""
