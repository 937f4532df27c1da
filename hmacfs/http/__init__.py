"""HTTP/1.1 plumbing: listeners and connections, request heads and bodies, responses, routing."""
