"""The network process: WebSockets and HTTP on one side, the shared-memory rings on the other."""
