#!/usr/bin/env bash
# One database and one role per service, as scripts/postgres_server.py makes them for the
# tests: the role owns its database, and no other role may connect to it (REVOKE ... FROM
# PUBLIC), so "database per service" is enforced by Postgres, not only by convention.
#
# The official postgres image runs this once, when it initialises an empty data directory
# (/docker-entrypoint-initdb.d), as the superuser over the local socket. Each role's password
# comes from <ROLE>_DB_PASSWORD (USERS_DB_PASSWORD, ORDER_HISTORY_DB_PASSWORD, ...): the
# compose file and the Kubernetes Secrets pass the same values to the services' DATABASE_URL.
# Kept in step with deploy/kubernetes/postgres.yaml, which carries a copy (a test compares).
set -euo pipefail

SERVICE_ROLES=(users catalog orders payments delivery notifications order_history)

for role in "${SERVICE_ROLES[@]}"; do
    variable="${role^^}_DB_PASSWORD"
    password="${!variable:-}"
    if [ -z "$password" ]; then
        echo "01-databases.sh: $variable is not set: no password for role $role" >&2
        exit 1
    fi
    # psql variables (:"role" an identifier, :'password' a literal) do the quoting; they
    # are expanded in what psql reads from stdin, not in -c. CREATE DATABASE cannot run in a
    # transaction block: stdin runs each statement on its own.
    psql --no-psqlrc -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" \
        --dbname "${POSTGRES_DB:-postgres}" -v role="$role" -v password="$password" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE :"role" OWNER :"role";
REVOKE ALL ON DATABASE :"role" FROM PUBLIC;
SQL
    echo "01-databases.sh: role and database $role"
done
