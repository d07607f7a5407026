"""The app the nesting tests and `cargo xtask bench nesting` trace: every
outgoing call carries the id of the request it is made for, so the right
parent of each client span is known without the agent.

    GET /async/{rid}   async def: redis.asyncio GET rid:{rid}, psycopg
                       AsyncConnection SELECT 1 AS r{rid}, httpx AsyncClient
                       GET {BACKEND}/backend/{rid}, then an asyncio.gather
                       fan-out of a Redis GET and a backend GET.
    GET /sync/{rid}    def (FastAPI runs it in its thread pool): the same
                       calls with redis-py, psycopg Connection and
                       httpx.Client, one after another.
    GET /backend/{rid} the backend: "ok" (BACKEND may point at this app).
    GET /health        "ok", calls nothing.

The ids appear in the client spans as the Redis key, the SQL column alias
(an identifier, so the sanitizer keeps it) and the URL path. Clients are
pooled per process (one Redis pool, one psycopg pool per kind, one HTTP
client per kind), as real apps do, so connections are shared by requests.

Environment: PG_URL, REDIS_PORT, BACKEND (base URL), POOL (connections per
pool, default 8).
"""

import asyncio
import os
import queue
from contextlib import asynccontextmanager

import httpx
import psycopg
import redis
import redis.asyncio as aredis
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

PG_URL = os.environ["PG_URL"]
REDIS_PORT = int(os.environ["REDIS_PORT"])
BACKEND = os.environ["BACKEND"].rstrip("/")
POOL = int(os.environ.get("POOL", "8"))


class AsyncPgPool:
    """A minimal pool: psycopg_pool is not installed, and a plain queue keeps
    the connections' use visible and simple."""

    def __init__(self):
        self.free = asyncio.Queue()

    async def open(self):
        for _ in range(POOL):
            conn = await psycopg.AsyncConnection.connect(PG_URL, autocommit=True)
            self.free.put_nowait(conn)

    async def query(self, sql):
        conn = await self.free.get()
        try:
            cur = await conn.execute(sql)
            return await cur.fetchone()
        finally:
            self.free.put_nowait(conn)


class SyncPgPool:
    def __init__(self):
        self.free = queue.Queue()
        for _ in range(POOL):
            self.free.put(psycopg.connect(PG_URL, autocommit=True))

    def query(self, sql):
        conn = self.free.get()
        try:
            return conn.execute(sql).fetchone()
        finally:
            self.free.put(conn)


state = {}


@asynccontextmanager
async def lifespan(_app):
    apg = AsyncPgPool()
    await apg.open()
    state["apg"] = apg
    state["pg"] = SyncPgPool()
    state["aredis"] = aredis.Redis(
        connection_pool=aredis.BlockingConnectionPool(port=REDIS_PORT, max_connections=POOL)
    )
    # Blocking pools: more threads (40) and tasks than connections wait.
    state["redis"] = redis.Redis(
        connection_pool=redis.BlockingConnectionPool(port=REDIS_PORT, max_connections=POOL)
    )
    limits = httpx.Limits(max_connections=POOL, max_keepalive_connections=POOL)
    state["ahttp"] = httpx.AsyncClient(limits=limits)
    state["http"] = httpx.Client(limits=limits)
    yield
    await state["ahttp"].aclose()
    state["http"].close()


app = FastAPI(lifespan=lifespan)


@app.get("/health", response_class=PlainTextResponse)
async def health():
    return "ok"


@app.get("/backend/{rid}", response_class=PlainTextResponse)
async def backend(rid: str):
    return "ok"


@app.get("/async/{rid}", response_class=PlainTextResponse)
async def handle_async(rid: int):
    await state["aredis"].get(f"rid:{rid}")
    await state["apg"].query(f"SELECT 1 AS r{rid}")
    await state["ahttp"].get(f"{BACKEND}/backend/{rid}")
    await asyncio.gather(
        state["aredis"].get(f"rid:{rid}"),
        state["ahttp"].get(f"{BACKEND}/backend/{rid}"),
    )
    return "ok"


@app.get("/sync/{rid}", response_class=PlainTextResponse)
def handle_sync(rid: int):
    state["redis"].get(f"rid:{rid}")
    state["pg"].query(f"SELECT 1 AS r{rid}")
    state["http"].get(f"{BACKEND}/backend/{rid}")
    return "ok"
