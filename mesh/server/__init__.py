"""The server side: what every service instance serves and how it joins and leaves the mesh.

mesh_server.py  MeshServer, ServerConfig: health, reflection, Consul registration, the
                interceptors in the order mesh/layers.py gives, graceful shutdown
hooks.py        running a hook around every servicer behavior (all four call shapes)
deadline.py     the inbound deadline in context for the servicer's outbound calls
faults.py       server-side fault injection (`--fault-*`)
reflection.py   server reflection that also resolves method symbols (grpcurl describe)
"""

from mesh.server.mesh_server import MeshServer, ServerConfig, new_instance_id

__all__ = ["MeshServer", "ServerConfig", "new_instance_id"]
