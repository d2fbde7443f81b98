#!/bin/sh
# First start of the postgres container: a database and role each for MLflow and orch.
set -eu
psql -v ON_ERROR_STOP=1 -U postgres <<SQL
CREATE ROLE mlflow LOGIN PASSWORD '${MLFLOW_DB_PASSWORD}';
CREATE DATABASE mlflow OWNER mlflow;
CREATE ROLE orch LOGIN PASSWORD '${ORCH_DB_PASSWORD}';
CREATE DATABASE orch OWNER orch;
SQL
