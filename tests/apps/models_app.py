"""The FastAPI app the end-to-end tests trace: a read-through Redis cache in
front of PostgreSQL, and an audit log in MariaDB.

    GET  /models/{id}  Redis GET model:{id}; on a miss SELECT in PostgreSQL,
                       then Redis SET model:{id} ... EX 60; 404 if no row.
                       Body: {"id", "name", "tenant", "source": "cache"|"db"}.
    POST /models       {"name": ...} with header x-tenant-id: INSERT ... RETURNING
                       id in PostgreSQL, then INSERT INTO audit in MariaDB.
                       Body: {"id": ...}.
    GET  /health       "ok", touches no database.

Run by tests/src/db.rs (`ModelsApp`) as
`python -m uvicorn models_app:app --host 127.0.0.1 --port P --workers 1
--loop asyncio --http h11`. Configuration from the environment: PG_URL,
MYSQL_HOST, MYSQL_PORT, MYSQL_DB, REDIS_PORT (APP_PORT is informational).

Threads: the endpoints are `async def` and call the blocking drivers
directly, so everything - accepting, reading the request, every SQL and
Redis round trip, writing the response - happens on the process's main
thread (the asyncio event loop; tid == pid). One request is in flight on
that thread at a time, and a request's database calls are made between its
read and its response write on the same thread.

What goes over the wire per request is fixed:
- PostgreSQL (psycopg 3, autocommit, no BEGIN/COMMIT): the extended protocol,
  Parse/Bind/Describe/Execute/Sync with the text "... WHERE id = $1". libpq
  first sends an SSLRequest, which the server answers with "N".
- MariaDB (PyMySQL, autocommit): after the handshake PyMySQL always sends
  COM_QUERY "SET NAMES utf8mb4"; then one COM_QUERY with the values inlined;
  COM_QUIT on close.
- Redis (redis-py, RESP2, no HELLO / CLIENT SETINFO on connect): only GET/SET
  (redis-py also polls the socket with a recv that returns EAGAIN before a
  command on a reused connection).
Connections: APP_CONNECTIONS=per-request (the default) opens and closes one
connection per database per request that uses it, so each request shows the
whole connection (connect, startup/handshake, query, terminate).
APP_CONNECTIONS=persistent opens one connection to each database at startup
and keeps it (the way a pool does), so it predates anything started after
the app; psycopg then switches a query to a named prepared statement from
its 5th execution on (prepare_threshold).
"""

import json
import os
from contextlib import asynccontextmanager, closing, contextmanager

import psycopg
import pymysql
import redis
from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

PG_URL = os.environ["PG_URL"]
MYSQL_HOST = os.environ.get("MYSQL_HOST", "127.0.0.1")
MYSQL_PORT = int(os.environ["MYSQL_PORT"])
MYSQL_DB = os.environ.get("MYSQL_DB", "zt")
REDIS_PORT = int(os.environ["REDIS_PORT"])
PERSISTENT = os.environ.get("APP_CONNECTIONS", "per-request") == "persistent"

# Open connections in persistent mode, by database.
_kept = {}


def _connect_pg():
    return psycopg.connect(PG_URL, autocommit=True)


def _connect_mysql():
    return pymysql.connect(
        host=MYSQL_HOST,
        port=MYSQL_PORT,
        user="root",
        password="",
        database=MYSQL_DB,
        autocommit=True,
    )


def _connect_redis():
    return redis.Redis(
        host="127.0.0.1", port=REDIS_PORT, protocol=2, driver_info=None
    )


_CONNECT = {"pg": _connect_pg, "mysql": _connect_mysql, "redis": _connect_redis}


@contextmanager
def db(name):
    """A connection to `name` ("pg", "mysql" or "redis") for one request."""
    if PERSISTENT:
        yield _kept[name]
    else:
        with closing(_CONNECT[name]()) as conn:
            yield conn


@asynccontextmanager
async def lifespan(_app):
    with closing(_connect_pg()) as pg:
        pg.execute(
            "CREATE TABLE IF NOT EXISTS models ("
            " id serial PRIMARY KEY, name text NOT NULL, tenant text)"
        )
    with closing(_connect_mysql()) as my, my.cursor() as cur:
        cur.execute(
            "CREATE TABLE IF NOT EXISTS audit ("
            " id INT AUTO_INCREMENT PRIMARY KEY,"
            " action VARCHAR(32) NOT NULL,"
            " model_id INT NOT NULL,"
            " tenant VARCHAR(64),"
            " at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)"
        )
    if PERSISTENT:
        for name, connect in _CONNECT.items():
            _kept[name] = connect()
        _kept["redis"].ping()
    yield
    for conn in _kept.values():
        conn.close()


app = FastAPI(lifespan=lifespan)


class NewModel(BaseModel):
    name: str


@app.get("/health", response_class=PlainTextResponse)
async def health():
    return "ok"


@app.get("/models/{model_id}")
async def get_model(model_id: int):
    key = f"model:{model_id}"
    with db("redis") as r:
        cached = r.get(key)
        if cached is not None:
            return {**json.loads(cached), "source": "cache"}
        with db("pg") as pg:
            row = pg.execute(
                "SELECT id, name, tenant FROM models WHERE id = %s", (model_id,)
            ).fetchone()
        if row is None:
            raise HTTPException(status_code=404, detail="no such model")
        model = {"id": row[0], "name": row[1], "tenant": row[2]}
        r.set(key, json.dumps(model), ex=60)
    return {**model, "source": "db"}


@app.post("/models")
async def create_model(body: NewModel, x_tenant_id: str | None = Header(default=None)):
    with db("pg") as pg:
        (model_id,) = pg.execute(
            "INSERT INTO models (name, tenant) VALUES (%s, %s) RETURNING id",
            (body.name, x_tenant_id),
        ).fetchone()
    with db("mysql") as my, my.cursor() as cur:
        cur.execute(
            "INSERT INTO audit (action, model_id, tenant) VALUES (%s, %s, %s)",
            ("create", model_id, x_tenant_id),
        )
    return {"id": model_id}
