"""The platform's edge: the gateway of meshkit.gateway with the platform's policy (policy.toml)
and users' key set for verifying tokens."""
