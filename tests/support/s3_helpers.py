"""A real S3 endpoint for tests: a moto server on 127.0.0.1, and a chaos proxy in front of it."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

logging.getLogger("werkzeug").setLevel(logging.ERROR)


class MotoServer:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._srv.start()
        host, port = self._srv.get_host_and_port()
        self.host, self.port = host, port
        self.endpoint = f"http://{host}:{port}"

    def options(self, endpoint: str | None = None, **extra) -> dict:
        opts = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint or self.endpoint, "region_name": "us-east-1"},
            "config_kwargs": {
                "connect_timeout": 1,
                "read_timeout": 3,
                "retries": {"max_attempts": 2, "mode": "standard"},
            },
            "retries": 1,
        }
        opts.update(extra)
        return opts

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def new_bucket(self) -> Bucket:
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return Bucket(self, name)

    def stop(self) -> None:
        self._srv.stop()


class Bucket:
    def __init__(self, server: MotoServer, name: str):
        self.server, self.name = server, name
        self.url = f"s3://{name}/ckpt"

    def storage_options(self, endpoint: str | None = None, **extra) -> dict:
        return {f"s3://{self.name}": self.server.options(endpoint, **extra)}

    def uploads(self, prefix: str = "") -> list[dict]:
        """Open multipart uploads (invisible to list_objects_v2)."""
        r = self.server.client().list_multipart_uploads(Bucket=self.name, Prefix=prefix)
        return list(r.get("Uploads", []))

    def put(self, key: str, body: bytes) -> None:
        self.server.client().put_object(Bucket=self.name, Key=key, Body=body)

    def get(self, key: str) -> bytes:
        return self.server.client().get_object(Bucket=self.name, Key=key)["Body"].read()

    def delete(self, key: str) -> None:
        self.server.client().delete_object(Bucket=self.name, Key=key)

    def destroy(self) -> None:
        """Remove every object, open upload and the bucket itself (the per-test reset)."""
        c = self.server.client()
        for u in self.uploads():
            c.abort_multipart_upload(Bucket=self.name, Key=u["Key"], UploadId=u["UploadId"])
        keys = self.keys()
        for i in range(0, len(keys), 1000):
            c.delete_objects(
                Bucket=self.name, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            )
        c.delete_bucket(Bucket=self.name)

    def keys(self, prefix: str = "") -> list[str]:
        c = self.server.client()
        out, token = [], None
        while True:
            kw = {"Bucket": self.name, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            r = c.list_objects_v2(**kw)
            out += [o["Key"] for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                return out
            token = r["NextContinuationToken"]


class MotoProcess(MotoServer):
    """A moto server in its own process: settings that are process-wide in moto (authentication)
    can be switched there without touching the session server."""

    def __init__(self) -> None:
        code = (
            "import sys, logging\nlogging.getLogger('werkzeug').setLevel(logging.ERROR)\n"
            "from moto.server import ThreadedMotoServer\n"
            "s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False); s.start()\n"
            "print(s.get_host_and_port()[1], flush=True); sys.stdin.read(); s.stop()\n"
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self._proc.stdout.readline()
        if not line.strip().isdigit():
            self._proc.kill()
            raise RuntimeError(f"moto server process did not start: {line!r}")
        self.host, self.port = "127.0.0.1", int(line)
        self.endpoint = f"http://{self.host}:{self.port}"

    def enable_auth(self) -> None:
        """From now on every request needs IAM credentials that this server knows (real 403s)."""
        req = urllib.request.Request(
            self.endpoint + "/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
        )
        urllib.request.urlopen(req, timeout=10).read()

    def stop(self) -> None:
        try:
            self._proc.stdin.close()
            self._proc.wait(timeout=10)
        except Exception:
            self._proc.kill()
            self._proc.wait()


class ChaosProxy:
    """A TCP proxy in front of the S3 server that can refuse, hang, throttle (503 SlowDown) or cut.

    mode: "pass" | "refuse" (close at once) | "hang" (accept, never answer) |
    "slowdown" (answer the next ``throttle`` requests with 503 SlowDown) | "cut" (forward
    ``cut_after`` bytes of the request body, then drop the connection).
    """

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.throttle = 0
        self.cut_after = 0
        self.requests = 0
        self.lines: list[str] = []  # request lines ("PUT /bucket/key HTTP/1.1") in arrival order
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                c, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self._conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        mode = self.mode
        if mode == "refuse":
            c.close()
            return
        if mode == "hang":
            while not self._stop.is_set() and self.mode == "hang":
                time.sleep(0.1)
            c.close()
            return
        try:
            up = socket.create_connection(self.target)
        except OSError:
            c.close()
            return
        threading.Thread(target=self._pipe, args=(up, c, False), daemon=True).start()
        self._pipe(c, up, True)

    def _pipe(self, src: socket.socket, dst: socket.socket, client_side: bool) -> None:
        # The mode is checked at every request, also on kept-alive connections opened earlier.
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if client_side and data[:4] in (b"GET ", b"PUT ", b"POST", b"HEAD", b"DELE"):
                    self.requests += 1
                    self.lines.append(data.split(b"\r\n", 1)[0].decode("latin-1"))
                    sent = 0
                    if self.mode == "refuse":
                        break
                    if self.mode == "hang":
                        while not self._stop.is_set() and self.mode == "hang":
                            time.sleep(0.1)
                        break
                    if self.mode == "slowdown" and self.throttle > 0:
                        self.throttle -= 1
                        body = (
                            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                            b"<Message>Please reduce your request rate.</Message></Error>"
                        )
                        src.sendall(
                            b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: "
                            + str(len(body)).encode()
                            + b"\r\nConnection: close\r\n\r\n"
                            + body
                        )
                        break
                if client_side and self.mode == "cut":
                    if sent + len(data) > self.cut_after:
                        dst.sendall(data[: max(0, self.cut_after - sent)])
                        break
                sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass
