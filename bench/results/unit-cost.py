# What a probed PyContext allocation costs a followed CPython process: one
# loopback exchange so the agent follows this process (it follows a process
# at its first traffic and probes its interpreter's context allocators),
# then contextvars.copy_context() 100,000 times, three rounds.
import contextvars, socket, time

srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
client = socket.create_connection(srv.getsockname())
server, _ = srv.accept()
for _ in range(50):
    client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    server.recv(100)
    server.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    client.recv(100)
time.sleep(3)
n = 100000
copy = contextvars.copy_context
for _ in range(3):
    t = time.perf_counter_ns()
    for _ in range(n):
        copy()
    print(f"{(time.perf_counter_ns() - t) / n:.0f} ns per copy_context()", flush=True)
