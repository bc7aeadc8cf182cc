"""HTTP/1.1 proxying: the per-connection driver, local replies."""
