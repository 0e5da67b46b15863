"""`meshctl`: the mesh's command line, a tool beside the library (mesh/) that uses it.

    cli.py          the command line and its subcommands
    load/           `meshctl load`, a ghz-like load tester for one RPC of any service in the mesh
    prometheus_sd/  `meshctl prometheus-sd`, Consul's instances as Prometheus targets
"""
