"""The client side: the call path of a MeshChannel, from the stub down to one sub-channel per
endpoint. The layers and their order are mesh/layers.py's; the policies each layer follows
are mesh/resilience/'s, and the values both sides share are mesh/core/'s.

    channel.py      MeshChannel: a grpc.aio.Channel for a service name
    upstream.py     per service: budget, breaker, bulkhead, ejection, balancer; per method: a plan
    admission.py    what a call passes before its first attempt, for every call shape
    attempt.py      picking an endpoint and starting one attempt
    unary_call.py   the attempt loop of a unary call (the hot path)
    stream_call.py  streaming calls, retried until the first response
    hedging.py      hedged attempts raced against a slow first one
    subchannels.py  one long-lived grpc.aio channel per endpoint, in step with discovery
"""
