"""The leaves of the call path: each module holds one concern's policy value next to the
mechanism that follows it, and knows nothing of channels, calls or servers.

    retry/       RetryPolicy and RetryState (whether and when), RetryBudget (how many),
                 server pushback, HedgePolicy
    balance/     P2C over peak-EWMA, round robin, recent latencies for the hedge delay
    breaker.py   BreakerPolicy, CircuitBreaker (per service)
    ejection.py  EjectionPolicy, OutlierDetector (per endpoint)
    bulkhead.py  BulkheadPolicy, ConcurrencyLimit (per service)
    faults.py    FaultPolicy, FaultInjector (client side; the server side's interceptor is
                 mesh/server/faults.py)

mesh/policy.py gathers them into one policy per service and method, read from one TOML file.
"""
