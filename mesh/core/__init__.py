"""What the client and the server side share, depending on neither: the classification of
call outcomes, the mesh's errors and their status codes, the Deadline value carried from an
inbound call to outbound ones, backoff, keepalive settings both sides agree on, and which
services are the mesh's own plumbing (health, reflection)."""
