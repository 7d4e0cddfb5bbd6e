"""The server's HTTP endpoints by concern, as FastAPI routers; each reaches the server's Runtime through its app's
state (routes.common.RuntimeDep)."""
