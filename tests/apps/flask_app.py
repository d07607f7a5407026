"""A Flask app on werkzeug's threaded development server, for contrast with
models_app.py: every connection gets a new thread, which reads the request,
runs the view (one PostgreSQL query on a connection of its own) and writes
the response.

    GET /models/{id}  SELECT id, name, tenant FROM models WHERE id = %s;
                      404 if no row. Body: {"id", "name", "tenant"}.
    GET /health       "ok", touches no database.

Run by tests/src/db.rs (`FlaskApp`) as `python flask_app.py`, configured by
PG_URL and APP_PORT. Creates the models table if it is missing.
"""

import logging
import os

import psycopg
from flask import Flask, abort

PG_URL = os.environ["PG_URL"]
PORT = int(os.environ["APP_PORT"])

app = Flask(__name__)


@app.get("/health")
def health():
    return "ok"


@app.get("/models/<int:model_id>")
def get_model(model_id):
    with psycopg.connect(PG_URL, autocommit=True) as pg:
        row = pg.execute(
            "SELECT id, name, tenant FROM models WHERE id = %s", (model_id,)
        ).fetchone()
    if row is None:
        abort(404)
    return {"id": row[0], "name": row[1], "tenant": row[2]}


if __name__ == "__main__":
    with psycopg.connect(PG_URL, autocommit=True) as pg:
        pg.execute(
            "CREATE TABLE IF NOT EXISTS models ("
            " id serial PRIMARY KEY, name text NOT NULL, tenant text)"
        )
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app.run(host="127.0.0.1", port=PORT, threaded=True)
