"""What both servers (tabular and generation) share over HTTP: errors and their one handler,
bounded bodies, request ids, the champion runtime, admin auth, clients, metrics, logs, the
protocol's limits, traffic rollups, and the client side that honours Retry-After."""
