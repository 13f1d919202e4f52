"""Distillation as a service: a REST API over the library's runs, worker processes, persistence, API keys, serving.

- `app.py` assembles the FastAPI application; `routes_*.py` hold its resources under `/v1`.
- `db.py` defines the tables (SQLAlchemy Core) and opens the store: SQLite in the data directory by default (WAL),
  PostgreSQL when a `postgresql://` URL is given; the schema carries a version that every process checks.
- `jobs.py` is the job store (create, claim with a lease, heartbeat, finish, cancel, retry, events, artifacts).
- `kinds.py` maps each job kind to the pydantic config the CLI uses and to the library function that runs it;
  `refs.py` turns the uploaded-file and job ids in a config into paths inside the data directory.
- `worker.py` claims jobs and runs them; `reporter.py` turns the library's progress calls into stored events.
- `inference.py` and `cascade.py` serve finished students (OpenAI-compatible) and cascade deployments.
- `auth.py` holds API keys (stored hashed) and their scopes; `files.py` validates and stores uploads.

Only this package, `distill.serve` and the `cli*.py` modules talk to the outside world; the library they call
takes every path and setting as an argument.
"""
