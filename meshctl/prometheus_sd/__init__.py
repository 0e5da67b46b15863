"""`meshctl prometheus-sd`: Consul's catalog as Prometheus service discovery.

Every instance registers in Consul with a `metrics_port` meta (its Prometheus endpoint, on the
instance's own address). Prometheus's `consul_sd_configs` would read that directly, but
Debian's Prometheus is built without it; file-based (`file_sd_configs`) and HTTP
(`http_sd_configs`) discovery are in every build, so this command turns the passing
instances into their target groups, once or kept current with blocking queries, written to a
file (atomically) and/or served over HTTP.

Modules: targets (health entries -> target groups, and the atomic file write), watch (the
blocking queries: the service list, and each service's passing instances), publish (the
command: the first read, the file, the HTTP endpoint, stopping on a signal).
"""
