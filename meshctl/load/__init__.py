"""`meshctl load`: a ghz-class load tester for one RPC of any service in the mesh.

    meshctl load orders foodmesh.orders.v1.OrderService/PlaceOrder \
        --data '{"customer_id": "ada", "idempotency_key": "{{uuid}}", ...}' \
        --concurrency 32 --duration 30s

The target is a Consul service name (calls go through a MeshChannel, so balancing, retries
and ejection are part of what is measured) or a plain host:port (a bare grpc.aio channel, for
comparison). The method and its messages come from server reflection, as with ghz and
grpcurl, or from the installed foodmesh stubs. Latency of every call goes into an HDR
histogram; worker processes merge their histograms exactly.

Modules: request (method lookup, JSON request templates), target (everything checked before
the first call: target, method, body), runner (one worker's call loops, closed and open
model), workers (running a plan in this process or in worker processes, merging their
records), stats (what a run records, and how records merge), report (summary, JSON, CSV,
plot), progress (the live line on a terminal), cli (the command line).
"""
