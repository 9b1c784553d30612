"""The configuration tree and how it is assembled from its four sources.

Precedence, lowest first: built-in defaults < JSON file < environment < command
line. Every value remembers where it came from, so a bad one is reported as one
line naming the setting, the value and its source, e.g.::

    server.port = "eighty" (config file ntonix.json): expected an integer

Environment rule: every setting ``section.key`` is read from
``NTONIX_<SECTION>_<KEY>`` (upper case), e.g. ``NTONIX_PROXY_RETRIES``. The
short seed names (``NTONIX_PORT``, ``NTONIX_SSL_PORT``, ``NTONIX_THREADS``,
``NTONIX_LOG_LEVEL``, ``NTONIX_BACKENDS``, ``NTONIX_CONFIG``) are aliases; when
both spellings are set, the long one wins. An unknown ``NTONIX_*`` variable,
and a port variable whose value is a service address (``tcp://10.0.0.1:8080``,
as Kubernetes sets for a Service named ``ntonix``), are ignored with a warning
line (``Config.warnings``), not refused.
"""

import json
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
from attrs import field, frozen

from ntonix.cache.redis_url import mask_redis_url, parse_redis_address
from ntonix.http.passthrough import DEFAULT_PASSTHROUGH, entry_problem

ENV_PREFIX = "NTONIX_"
# The inference scorer's weights: in the spirit of AIGW's defaults.
DEFAULT_WEIGHTS = {"prefix": 2.0, "queue": 1.0, "prefill": 3.0, "lora": 1.0}
DEFAULT_SOURCE = "default"


class ConfigError(Exception):
    """One or more settings are invalid; ``lines`` has one message per problem."""

    def __init__(self, lines: Sequence[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)


def setting(
    default: Any = attrs.NOTHING,
    *,
    help: str,
    min: Optional[float] = None,
    max: Optional[float] = None,
    choices: Optional[Sequence[str]] = None,
    factory: Optional[Callable[[], Any]] = None,
    cli: Optional[str] = None,
    restart: bool = False,
    number_ok: bool = False,
    secret: bool = False,
) -> Any:
    """An attrs field carrying what validation and documentation need.

    ``restart`` marks settings that a SIGHUP reload cannot change;
    ``number_ok`` a string setting that also takes a JSON number (``2`` as
    well as ``"2"`` or ``"auto"``); ``secret`` one whose value is never
    shown (errors, the console's view of the configuration).
    """
    meta = {"help": help, "min": min, "max": max, "choices": choices, "cli": cli,
            "restart": restart, "number_ok": number_ok, "secret": secret}
    if factory is not None:
        return field(factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@frozen
class ServerConfig:
    port: int = setting(8080, min=0, max=65535, cli="--port", restart=True,
                        help="plain HTTP listening port (0 picks a free one)")
    ssl_port: int = setting(8443, min=0, max=65535, cli="--ssl-port", restart=True,
                            help="HTTPS listening port, used when ssl.enabled")
    workers: str = setting("1", cli="--workers", restart=True, number_ok=True,
                           help="gateway processes, each connection given to the least busy: "
                                "a number, or auto (one per CPU)")
    threads: int = setting(1, min=1, max=256, cli="--threads", restart=True,
                           help="the seed's name for server.workers (its alias)")
    bind_address: str = setting("0.0.0.0", cli="--bind", restart=True,
                                help="address the listeners bind to")
    secret: str = setting("", restart=True, secret=True,
                          help="key of the hashes standing for credentials (tenants, cache "
                               "scope); every gateway sharing a Redis needs the same one "
                               "(empty: server.secret_file, else one made at start)")
    secret_file: str = setting("", restart=True,
                               help="file holding server.secret when it is empty; made (mode "
                                    "0600) with a new secret when missing")
    max_body_bytes: int = setting(10 * 1024 * 1024, min=1,
                                  restart=True, help="largest request body accepted (else 413)")
    max_headers: int = setting(100, min=1, max=10000,
                               restart=True, help="most request header lines accepted (else 431)")
    max_header_bytes: int = setting(16384, min=256,
                                    restart=True, help="largest request line plus headers (else 431)")
    # Far deeper than any OpenAI request (a tool's JSON schema nests about
    # ten levels); 256 at most keeps the gateway's recursive code (the cache
    # key) far from Python's recursion limit of about 1,000 frames.
    max_json_depth: int = setting(64, min=1, max=256,
                                  help="deepest nesting of arrays and objects in a JSON request "
                                       "body (else 400)")
    # Caps per process: with server.workers, each worker has its own. An
    # idle connection costs the process about 5 KiB (4,000 idle keep-alive
    # connections: +19 MB), a stream its backend connection too; the larger
    # cost is the kernel's socket buffers, up to tens of KiB per busy socket:
    # 4096 streams, 8,192 sockets, stay within a 2 GB machine with two
    # workers, and their 8,256 descriptors within a container's usual limit
    # (a warning at start when `ulimit -n` is lower).
    max_connections: int = setting(
        4096, min=1, restart=True,
        help="open client connections per process (each worker has its own); at the cap the "
             "connection idle longest between requests is closed for a new one, and with "
             "none idle the listeners stop accepting until one closes")
    max_connections_per_client: int = setting(
        256, min=0, restart=True,
        help="open connections from one client address per process (each worker has its "
             "own; 0: no cap); past it a new one is closed at once; loopback and "
             "tenants.trusted_proxies are exempt")
    # Every body is kept until its answer ends (a retry sends it again), and
    # a parsed one costs a few times its size: 128 MiB is a dozen bodies at
    # server.max_body_bytes, or thousands of usual chat bodies, per process.
    max_buffered_body_bytes: int = setting(
        128 * 1024 * 1024, min=1, restart=True,
        help="request body bytes held per process over all connections (each worker has its "
             "own), from a body's first byte until its answer ends; past it 503 with "
             "Retry-After")
    header_timeout_seconds: float = setting(10.0, min=0.001,
                                            restart=True, help="deadline to receive a whole request head")
    body_timeout_seconds: float = setting(60.0, min=0.001,
                                          restart=True, help="deadline to receive a whole request body")
    max_upstream_head_bytes: int = setting(
        32 * 1024, min=1024, restart=True,
        help="largest backend response head (status line plus headers) relayed (else 502)")
    max_upstream_headers: int = setting(
        100, min=1, max=10000, restart=True,
        help="most backend response header lines relayed (else 502)")
    idle_timeout_seconds: float = setting(75.0, min=0.001,
                                          restart=True, help="keep-alive connection idle time before close")
    drain_delay_seconds: float = setting(
        0.0, min=0, restart=True,
        help="on SIGTERM, how long readiness answers 503 while requests are still "
             "accepted, before the listeners close (time for load balancers to stop sending)")
    shutdown_timeout_seconds: float = setting(30.0, cli="--shutdown-timeout", min=0,
                                              restart=True, help="on SIGTERM, how long in-flight requests may finish")


@frozen
class BackendConfig:
    host: str = setting(help="backend host name or address")
    port: int = setting(min=1, max=65535, help="backend port")
    weight: int = setting(1, min=1, max=1000, help="share of traffic relative to the others")
    tls: bool = setting(False, help="speak HTTPS to the backend (an https:// URL)")
    # What it serves beyond what it reports at GET /v1/models; empty with no
    # report means "anything".
    models: Tuple[str, ...] = setting((), help="models (and LoRA adapters) it serves")
    health_path: str = setting("", help="its health check path (empty: health.path; "
                                        "a 404 there falls back to /, as Ollama answers)")
    max_concurrency: int = setting(0, min=0, help="requests it is sent at once, at most "
                                                  "(0: no limit); more wait in the admission "
                                                  "queue")
    metrics_path: str = setting("/metrics", help="where it serves Prometheus metrics in vLLM's "
                                                 "names (scraped by the inference balancer; "
                                                 "empty: not scraped)")

    @property
    def name(self) -> str:
        return f"https://{self.host}:{self.port}" if self.tls else f"{self.host}:{self.port}"


@frozen
class CacheConfig:
    enabled: bool = setting(True, help="answer repeated deterministic prompts from memory")
    max_size_mb: float = setting(512, cli="--cache-size-mb", min=0, help="memory bound of the response cache")
    ttl_seconds: float = setting(3600, cli="--cache-ttl", min=0, help="how long an answer stays fresh")
    scope: str = setting("credential", choices=("credential", "global"),
                         help="share entries across Authorization credentials or not")
    sampled: bool = setting(False, help="also cache requests with temperature > 0")
    replay: str = setting("instant", choices=("instant", "paced"),
                          help="replay cached streams at once or at the recorded pace")
    max_entry_mb: float = setting(8, min=0, help="largest single cached answer")
    redis_url: str = setting("", restart=True,
                             help="redis://[:password@]host:port/db (rediss:// for TLS) of a "
                                  "Redis shared by gateways as the second cache tier (empty: "
                                  "none)")
    redis_prefix: str = setting("ntonix:v1:", restart=True,
                                help="prefix of every key the gateway writes in Redis")
    redis_timeout_seconds: float = setting(0.1, min=0.001, restart=True,
                                           help="longest wait for Redis; slower is a failure "
                                                "and the request goes on without it")
    redis_lease_seconds: float = setting(5.0, min=0.1,
                                         help="how long a gateway's claim to lead an answer "
                                              "lasts without renewal (a dead leader's "
                                              "followers take over after this)")
    redis_secret: str = setting("", restart=True, secret=True,
                                help="key of the HMAC on every entry and live answer in Redis, "
                                     "16 characters at least; every gateway sharing the Redis "
                                     "must have the same one (empty: checked but not "
                                     "authenticated, a warning at start)")
    redis_ca_file: str = setting("", restart=True,
                                 help="PEM file of the CA certificates a rediss:// "
                                      "cache.redis_url's server certificate must chain to "
                                      "(empty: the system's trust store)")
    cross_format: bool = setting(True, help="serve a cached plain answer to a streamed request "
                                            "(converted) and the reverse")


@frozen
class ClusterConfig:
    redis_url: str = setting("", restart=True,
                             help="redis://[:password@]host:port/db through which gateways share "
                                  "their scheduling state (prefix index, loads, latency samples) "
                                  "with the inference balancer (empty: cache.redis_url; off: "
                                  "none)")


@frozen
class SslConfig:
    enabled: bool = setting(False, restart=True, help="serve HTTPS on server.ssl_port")
    cert_file: str = setting("", cli="--cert", restart=True, help="PEM certificate (chain) file")
    key_file: str = setting("", cli="--key", restart=True, help="PEM private key file")
    sni: Dict[str, Any] = setting(factory=dict,
                                  restart=True, help='per host name pairs: {"host": {"cert_file", "key_file"}}')


@frozen
class LoggingConfig:
    level: str = setting("info", choices=("trace", "debug", "info", "warn", "error"),
                         cli="--log-level", restart=True, help="lowest level logged")
    file: str = setting("", cli="--log-file", restart=True,
                       help="JSON-lines log file; empty logs to stdout")
    max_file_size_mb: float = setting(100, min=0.001, restart=True,
                                      help="rotate the log file at this size")
    max_files: int = setting(5, min=1, restart=True, help="rotated log files kept")
    enable_console: bool = setting(True, restart=True, help="human-readable log on stdout")
    enable_colors: bool = setting(True, restart=True, help="colour the console log on a TTY")


@frozen
class HealthConfig:
    interval_seconds: float = setting(5.0, min=0.01, help="time between active health checks")
    timeout_seconds: float = setting(2.0, min=0.01, help="health check timeout")
    path: str = setting("/health", help="backend health check path")
    failure_threshold: int = setting(3, min=1, help="consecutive failures that open a circuit")
    recovery_seconds: float = setting(10.0, min=0.01, help="open circuit wait before a trial")


@frozen
class ProxyConfig:
    passthrough: Tuple[str, ...] = setting(
        DEFAULT_PASSTHROUGH,
        help="requests beyond the gateway's own routes relayed to a backend as they are: "
             "\"METHOD /v1/path\" entries (/v1/path alone: GET and POST; a last segment * "
             "for anything below); management routes are not in the default")
    expose_backend: bool = setting(True, help="name the backend that answered (X-Backend) and "
                                              "the failing one in error messages")
    stream_usage: bool = setting(True, help="ask backends for a stream's usage chunk when the "
                                            "client did not, to count its tokens (the chunk "
                                            "is taken out before the client sees it)")
    connect_timeout_seconds: float = setting(5.0, min=0.001, help="backend TCP connect timeout")
    response_timeout_seconds: float = setting(120.0, cli="--response-timeout", min=0.001,
                                              help="wait for the backend's response head (else 504)")
    stream_idle_timeout_seconds: float = setting(60.0, min=0.001,
                                                 help="longest silence between stream chunks")
    first_token_timeout_seconds: float = setting(30.0, min=0.001,
                                                 help="wait for a stream's first content event")
    retries: int = setting(1, cli="--retries", min=0, max=10, help="retries on another backend before any byte")
    pool_size_per_backend: int = setting(10, min=1, help="idle keep-alive connections kept per backend once traffic calms")
    # Below uvicorn's (vLLM's) 5 s keep-alive, so the gateway closes an idle
    # connection before the backend does and never writes into a closed one.
    pool_idle_seconds: float = setting(4.0, min=0.001, help="close pooled connections idle this long")
    ca_file: str = setting("", restart=True,
                           help="PEM file of the CAs that HTTPS backends' certificates are "
                                "checked against (empty: the system's)")


@frozen
class BalancerConfig:
    algorithm: str = setting("weighted_round_robin", cli="--balancer",
                             choices=("weighted_round_robin", "least_outstanding", "inference"),
                             help="how a backend is picked (inference: by prefix-cache "
                                  "locality, queue and prefill load)")
    weights: Dict[str, Any] = setting(
        factory=lambda: dict(DEFAULT_WEIGHTS),
        help="the inference scorer's weights: prefix, queue, prefill, lora")
    model_weights: Dict[str, Any] = setting(
        factory=dict, help="weights per model, overriding balancer.weights "
                           '(e.g. {"llama-3-8b": {"prefix": 4}})')
    prefix_block_bytes: int = setting(256, min=16, max=65536,
                                      help="bytes of rendered prompt per prefix block")
    prefix_max_blocks: int = setting(256, min=1, max=65536,
                                     help="leading blocks of a prompt the prefix index looks at")
    prefix_capacity_blocks: int = setting(
        16384, min=1, help="prefix blocks remembered per backend (LRU): about its KV cache "
                           "in tokens / (prefix_block_bytes / 4)")
    spill_ratio: float = setting(1.5, min=1.0,
                                 help="a backend with more than this times the fleet's mean "
                                      "load (+2) takes no request for its prefix affinity")
    scrape_interval_seconds: float = setting(1.0, min=0.05,
                                             help="how often backends' metrics are scraped "
                                                  "(inference balancer)")
    scrape_timeout_seconds: float = setting(0.5, min=0.01,
                                            help="a metrics scrape slower than this fails")
    backend_queue_limit: int = setting(0, min=0,
                                       help="a backend whose metrics report more waiting "
                                            "requests than this is full (0: not used)")
    queue_size: int = setting(1000, min=0, help="requests that may wait for a free backend "
                                                 "(0: none wait; 429 at once)")
    queue_timeout_seconds: float = setting(10.0, min=0.0,
                                           help="how long a request waits for a free backend "
                                                "before its 429")
    sheddable_queue_share: float = setting(0.5, min=0.0, max=1.0,
                                           help="sheddable requests are refused without "
                                                "waiting once the queue is this full")


PRIORITIES = ("critical", "standard", "sheddable")
# Headers that carry credentials: never a tenant's name (it becomes a label).
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "cookie"})


@frozen
class TenantsConfig:
    header: str = setting("", help="request header naming the tenant, believed only from "
                                   "tenants.trusted_proxies (empty: the credential decides)")
    trusted_proxies: Tuple[str, ...] = setting(
        (), help="addresses or CIDRs of the proxies whose tenant header and X-Forwarded-For "
                 "are believed (comma-separated)")
    keys: Dict[str, Any] = setting(
        factory=dict, help='"sha256:<hex of the API key>" -> tenant; with keys listed, every '
                           "other credential is the tenant unlisted")
    classes: Dict[str, Any] = setting(
        factory=dict, help='tenant -> {"priority": "critical|standard|sheddable", "weight": N}')
    default_priority: str = setting("standard", choices=PRIORITIES,
                                    help="the priority of tenants not in tenants.classes")
    max_tracked: int = setting(20, min=1, max=1000,
                               help="tenants with their own metrics label; the rest are "
                                    "counted as \"other\"")


@frozen
class AdminConfig:
    enabled: bool = setting(False, restart=True, help="start the SSH manhole console")
    port: int = setting(2222, min=0, max=65535, restart=True, help="console port")
    bind: str = setting("127.0.0.1", restart=True, help="console bind address")
    user: str = setting("admin", restart=True, help="console user name")
    authorized_keys: str = setting("", restart=True, help="authorized_keys file for the console")
    host_key: str = setting("", restart=True, help="SSH host private key file")
    http_port: int = setting(
        9180, min=-1, max=65535, restart=True,
        help="port of the admin HTTP listener (/metrics, /backends, /cache/stats); 0 picks a "
             "free one, -1 none")
    http_bind: str = setting("127.0.0.1", restart=True, help="admin HTTP listener bind address")
    token: str = setting("", secret=True,
                         help="bearer token that opens the admin routes on the public "
                                  "port, and on the admin listener when it is not bound to "
                                  "loopback (then it is required)")


@frozen
class DemoConfig:
    enabled: bool = setting(False, cli="--demo", restart=True,
                            help="start two mock LLM backends in-process and use them")
    ports: List[int] = setting(factory=lambda: [8001, 8002], restart=True,
                               help="ports of the demo mock backends")


@frozen
class Config:
    server: ServerConfig = field(factory=ServerConfig)
    backends: Tuple[BackendConfig, ...] = field(default=())
    cache: CacheConfig = field(factory=CacheConfig)
    cluster: ClusterConfig = field(factory=ClusterConfig)
    ssl: SslConfig = field(factory=SslConfig)
    logging: LoggingConfig = field(factory=LoggingConfig)
    health: HealthConfig = field(factory=HealthConfig)
    proxy: ProxyConfig = field(factory=ProxyConfig)
    balancer: BalancerConfig = field(factory=BalancerConfig)
    tenants: TenantsConfig = field(factory=TenantsConfig)
    admin: AdminConfig = field(factory=AdminConfig)
    demo: DemoConfig = field(factory=DemoConfig)
    # Where the file part came from, for reloads and the console; not a setting.
    source_file: Optional[str] = field(default=None)
    # Where each setting that is not a default came from, for errors found
    # after validation (a certificate that does not load, say).
    sources: Dict[str, str] = field(factory=dict, eq=False)
    # Problems that did not stop the load (an unknown environment variable),
    # one line each, for the log at start.
    warnings: Tuple[str, ...] = field(default=(), eq=False)

    def source_of(self, key: str) -> str:
        return self.sources.get(key, DEFAULT_SOURCE)


SECTIONS: Dict[str, type] = {
    f.name: f.type for f in attrs.fields(Config)
    if f.name not in ("backends", "source_file", "sources", "warnings")
}

# Short environment names from the seed, mapped to the setting they alias.
ENV_ALIASES = {
    "NTONIX_PORT": "server.port",
    "NTONIX_SSL_PORT": "server.ssl_port",
    "NTONIX_THREADS": "server.threads",
    "NTONIX_LOG_LEVEL": "logging.level",
}
ENV_BACKENDS = "NTONIX_BACKENDS"
ENV_CONFIG = "NTONIX_CONFIG"

# Kubernetes gives every pod, for each Service in its namespace, variables
# named after the Service (``ntonix`` -> ``NTONIX_SERVICE_HOST``,
# ``NTONIX_SERVICE_PORT[_<NAME>]``, ``NTONIX_PORT=tcp://10.0.0.1:8080``,
# ``NTONIX_PORT_8080_TCP[_PROTO|_PORT|_ADDR]``), as Docker links did. They
# share our prefix: they are recognised to say so in the warning.
_K8S_VARIABLE = re.compile(
    r"(?P<service>[A-Z0-9_]+?)_(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?"
    r"|(?P<bare>PORT)|PORT_\d+_(?:TCP|UDP|SCTP)(?:_PROTO|_PORT|_ADDR)?)")
# A ``scheme://`` value of a port variable: a service address, not a port.
_SERVICE_ADDRESS = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://")
PORT_SETTINGS = ("server.port", "server.ssl_port", "admin.port")


def _k8s_service(name: str, value: str) -> Optional[str]:
    """The Kubernetes Service whose discovery variable ``name`` (set to
    ``value``) looks like, if any."""
    m = _K8S_VARIABLE.fullmatch(name)
    if m is None or m.group("bare") and not _SERVICE_ADDRESS.match(value):
        return None
    return m.group("service").lower().replace("_", "-")


def env_name(key: str) -> str:
    """The environment variable for ``section.key``."""
    return ENV_PREFIX + key.replace(".", "_").upper()


def all_settings() -> List[Tuple[str, attrs.Attribute]]:
    """Every ``section.key`` with its attrs field, in declaration order."""
    out = []
    for section, cls in SECTIONS.items():
        for f in attrs.fields(cls):
            out.append((f"{section}.{f.name}", f))
    return out


def default_of(f: attrs.Attribute) -> Any:
    if isinstance(f.default, attrs.Factory):
        return f.default.factory()
    return f.default


@frozen
class Raw:
    """A value before validation, and where it came from."""
    value: Any
    source: str
    # Text from the environment or the command line is parsed; JSON is typed.
    text: bool


def _show(value: Any) -> str:
    if isinstance(value, str) and "://" in value:
        value = mask_redis_url(value)  # a URL's user and password are a credential
    return json.dumps(value)


def _problem(key: str, raw: Raw, why: str) -> str:
    return f"{key} = {_show(raw.value)} ({raw.source}): {why}"


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(key: str, f: attrs.Attribute, raw: Raw) -> Any:
    """Turn ``raw`` into the field's type and check its bounds; ConfigError's
    line on failure."""
    typ, v, meta = f.type, raw.value, f.metadata

    def bad(why: str) -> ConfigError:
        if meta.get("secret"):
            return ConfigError([f"{key} ({raw.source}): {why}"])
        return ConfigError([_problem(key, raw, why)])

    if typ is bool:
        if raw.text:
            low = str(v).strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise bad("expected true or false")
        if not isinstance(v, bool):
            raise bad("expected true or false")
        return v
    if typ is int:
        if raw.text:
            try:
                v = int(str(v).strip(), 10)
            except ValueError:
                raise bad("expected an integer") from None
        elif isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise bad("expected an integer")
    elif typ is float:
        if raw.text:
            try:
                v = float(str(v).strip())
            except ValueError:
                raise bad("expected a number") from None
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad("expected a number")
        v = float(v)
        if v != v or v in (float("inf"), float("-inf")):
            raise bad("expected a finite number")
    elif typ is str:
        if meta.get("number_ok") and isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            raise bad("expected a string")
    elif typ == List[int]:
        if raw.text:
            parts = [p.strip() for p in str(v).split(",") if p.strip()]
        elif isinstance(v, list):
            parts = v
        else:
            raise bad("expected a list of integers")
        out = []
        for p in parts:
            try:
                n = int(p) if raw.text else p
            except ValueError:
                raise bad("expected a list of integers") from None
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 65535:
                raise bad("expected a list of ports (0-65535)")
            out.append(n)
        return out
    elif typ == Tuple[str, ...]:
        if raw.text:
            v = [p.strip() for p in str(v).split(",") if p.strip()]
        if not isinstance(v, (list, tuple)) or not all(isinstance(p, str) and p for p in v):
            raise bad("expected a list of names")
        return tuple(v)
    elif typ == Dict[str, Any]:
        if raw.text:
            try:
                v = json.loads(v)
            except ValueError:
                raise bad("expected a JSON object") from None
        if not isinstance(v, dict):
            raise bad("expected a JSON object")
        return v

    lo, hi = meta.get("min"), meta.get("max")
    if typ in (int, float):
        if lo is not None and v < lo or hi is not None and v > hi:
            if hi is None:
                raise bad(f"must be at least {lo:g}")
            raise bad(f"must be between {lo:g} and {hi:g}")
    choices = meta.get("choices")
    if choices and v not in choices:
        raise bad("must be one of " + ", ".join(choices))
    return v


def parse_backend_spec(spec: str) -> Tuple[str, int, int, bool]:
    """``host:port[:weight]`` or ``http(s)://host[:port][:weight]`` → (host,
    port, weight, tls); ValueError with the reason."""
    spec = spec.strip()
    tls = False
    if "://" in spec:
        scheme, _, rest = spec.partition("://")
        if scheme.lower() not in ("http", "https"):
            raise ValueError(f"scheme {scheme!r} is not http or https")
        tls = scheme.lower() == "https"
        if "/" in rest.rstrip("/"):
            raise ValueError("a backend URL has no path: give http(s)://host:port")
        rest = rest.rstrip("/")
        if rest.count(":") == 0:
            rest += ":443" if tls else ":80"
        spec = rest
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise ValueError("expected host:port[:weight] or http(s)://host:port[:weight]")
    host = parts[0]
    try:
        port = int(parts[1], 10)
    except ValueError:
        raise ValueError("port is not an integer") from None
    if not 1 <= port <= 65535:
        raise ValueError("port must be between 1 and 65535")
    weight = 1
    if len(parts) == 3:
        try:
            weight = int(parts[2], 10)
        except ValueError:
            raise ValueError("weight is not an integer") from None
        if weight < 1:
            raise ValueError("weight must be at least 1")
    return host, port, weight, tls


def _backends_from(raw: Raw, errors: List[str]) -> List[BackendConfig]:
    out: List[BackendConfig] = []
    if raw.text and str(raw.value).lstrip().startswith("["):
        # The file's list form in a variable: the only way to give models
        # or paths per backend from the environment.
        try:
            raw = Raw(json.loads(str(raw.value)), raw.source, False)
        except ValueError:
            errors.append(_problem("backends", raw, "not a valid JSON list"))
            return out
    if raw.text:
        specs = [s for s in str(raw.value).split(",") if s.strip()]
        for spec in specs:
            try:
                host, port, weight, tls = parse_backend_spec(spec)
            except ValueError as e:
                errors.append(f"backends = {_show(spec.strip())} ({raw.source}): {e}")
                continue
            out.append(BackendConfig(host, port, weight, tls))
        return out
    if not isinstance(raw.value, list):
        errors.append(_problem("backends", raw, "expected a list of {host, port, weight}"))
        return out
    for i, item in enumerate(raw.value):
        where = f"backends[{i}]"
        if isinstance(item, str):
            try:
                out.append(BackendConfig(*parse_backend_spec(item)))
            except ValueError as e:
                errors.append(f"{where} = {_show(item)} ({raw.source}): {e}")
            continue
        if not isinstance(item, dict):
            errors.append(f"{where} = {_show(item)} ({raw.source}): "
                          "expected an object with host and port")
            continue
        known = [f.name for f in attrs.fields(BackendConfig)]
        item = dict(item)
        if "url" in item:
            try:
                host, port, weight, tls = parse_backend_spec(str(item.pop("url")))
            except ValueError as e:
                errors.append(f"{where}.url ({raw.source}): {e}")
                continue
            item.setdefault("host", host)
            item.setdefault("port", port)
            item.setdefault("tls", tls)
        unknown = set(item) - set(known)
        if unknown:
            errors.append(f"{where}.{sorted(unknown)[0]} ({raw.source}): unknown key; "
                          "expected url or " + ", ".join(known))
            continue
        values = {}
        before = len(errors)
        for f in attrs.fields(BackendConfig):
            if f.name not in item:
                if f.default is attrs.NOTHING:
                    errors.append(f"{where}.{f.name} ({raw.source}): missing")
                continue
            try:
                values[f.name] = _coerce(f"{where}.{f.name}", f, Raw(item[f.name], raw.source, False))
            except ConfigError as e:
                errors.extend(e.lines)
        if values.get("host") == "":
            errors.append(f"{where}.host ({raw.source}): must not be empty")
        if len(errors) == before:
            out.append(BackendConfig(**values))
    return out


def read_file_layer(path: str) -> Dict[str, Raw]:
    """The settings of a JSON config file, flattened to ``section.key``."""
    source = f"config file {path}"
    try:
        with open(path, "rb") as fh:
            text = fh.read()
    except OSError as e:
        raise ConfigError([f"config file {path}: cannot be read: {e.strerror or e}"]) from None
    try:
        doc = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"config file {path}: not UTF-8 text"]) from None
    except ValueError as e:
        raise ConfigError([f"config file {path}: not valid JSON: {e}"]) from None
    if not isinstance(doc, dict):
        raise ConfigError([f"config file {path}: expected a JSON object at the top"])
    layer: Dict[str, Raw] = {}
    errors: List[str] = []
    for section, body in doc.items():
        if section == "backends":
            layer["backends"] = Raw(body, source, False)
            continue
        if section not in SECTIONS:
            errors.append(f"{section} ({source}): unknown section; expected one of "
                          + ", ".join(["backends", *SECTIONS]))
            continue
        if not isinstance(body, dict):
            errors.append(_problem(section, Raw(body, source, False), "expected a JSON object"))
            continue
        known = {f.name for f in attrs.fields(SECTIONS[section])}
        for key, value in body.items():
            if key not in known:
                errors.append(f"{section}.{key} ({source}): unknown setting")
                continue
            layer[f"{section}.{key}"] = Raw(value, source, False)
    if errors:
        raise ConfigError(errors)
    return layer


def read_env_layer(environ: Mapping[str, str],
                   warnings: Optional[List[str]] = None) -> Dict[str, Raw]:
    """Settings from ``NTONIX_*`` variables.

    An unknown ``NTONIX_`` name is not refused (Kubernetes sets several for a
    Service named ``ntonix`` in every pod) but reported, one line in
    ``warnings``, since it may be a typo. So is a port variable whose value
    is a service address such as ``tcp://10.0.0.1:8080``: it is ignored.
    """
    by_env = {env_name(key): key for key, _ in all_settings()}
    layer: Dict[str, Raw] = {}
    found: List[str] = []

    def take(name: str, key: str) -> None:
        value = environ[name]
        if key in PORT_SETTINGS and _SERVICE_ADDRESS.match(value):
            service = _k8s_service(name, value)
            found.append(f"{key} = {_show(value)} (environment {name}): a service address, "
                         "not a port, ignored" + (f" (as Kubernetes sets for a Service named "
                                                 f"{service})" if service else ""))
            return
        layer[key] = Raw(value, f"environment {name}", True)

    # Aliases first so that the long spelling, applied after, wins.
    for name, key in ENV_ALIASES.items():
        if name in environ:
            take(name, key)
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in ENV_ALIASES:
            continue
        if name == ENV_BACKENDS:
            layer["backends"] = Raw(value, f"environment {name}", True)
        elif name == ENV_CONFIG:
            continue
        elif name in by_env:
            take(name, by_env[name])
        else:
            # The value is not shown: an unknown variable may hold a secret.
            service = _k8s_service(name, value)
            found.append(f"{name} (environment): " + (
                f"not a setting, ignored (as Kubernetes sets for a Service named {service})"
                if service else "unknown setting, ignored; see `twistd ntonix --help`"))
    if warnings is not None:
        warnings.extend(found)
    return layer


def build(layers: Sequence[Mapping[str, Raw]], source_file: Optional[str] = None,
          warnings: Sequence[str] = ()) -> Config:
    """Merge ``layers`` (lowest precedence first) over the defaults and validate;
    ``warnings`` are kept on the result."""
    merged: Dict[str, Raw] = {}
    for layer in layers:
        merged.update(layer)
    errors: List[str] = []
    sections: Dict[str, Dict[str, Any]] = {}
    for key, f in all_settings():
        section, name = key.split(".", 1)
        raw = merged.get(key)
        if raw is None:
            continue
        try:
            sections.setdefault(section, {})[name] = _coerce(key, f, raw)
        except ConfigError as e:
            errors.extend(e.lines)
    backends: List[BackendConfig] = []
    if "backends" in merged:
        backends = _backends_from(merged["backends"], errors)
        seen: Dict[str, int] = {}
        for i, b in enumerate(backends):
            if b.name in seen:
                errors.append(f"backends = {_show(b.name)} ({merged['backends'].source}): "
                              "duplicate backend")
            seen[b.name] = i
    if errors:
        raise ConfigError(errors)
    built = {s: SECTIONS[s](**sections.get(s, {})) for s in SECTIONS}
    cfg = Config(backends=tuple(backends), source_file=source_file,
                 sources={k: raw.source for k, raw in merged.items()},
                 warnings=tuple(warnings), **built)
    return _check_combinations(cfg, merged)


def _weight_problems(key: str, weights: Any, merged: Mapping[str, Raw]) -> List[str]:
    setting_key = ".".join(key.split(".")[:2])
    src = merged[setting_key].source if setting_key in merged else DEFAULT_SOURCE
    if not isinstance(weights, dict):
        return [f"{key} = {_show(weights)} ({src}): expected an object of weights "
                "(" + ", ".join(DEFAULT_WEIGHTS) + ")"]
    out = []
    for name, value in weights.items():
        if name not in DEFAULT_WEIGHTS:
            out.append(f"{key}.{name} ({src}): unknown weight; expected "
                       + ", ".join(DEFAULT_WEIGHTS))
        elif isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0 <= value <= 1000:
            out.append(f"{key}.{name} = {_show(value)} ({src}): expected a number from 0 to 1000")
    return out


def _check_combinations(cfg: Config, merged: Mapping[str, Raw]) -> Config:
    """Rules that involve more than one setting."""
    errors = []
    if cfg.ssl.enabled and not (cfg.ssl.cert_file and cfg.ssl.key_file):
        src = merged.get("ssl.enabled", Raw(True, DEFAULT_SOURCE, False)).source
        errors.append(f"ssl.enabled = true ({src}): needs ssl.cert_file and ssl.key_file")
    workers = cfg.server.workers.strip().lower()
    if workers != "auto" and not (workers.isdigit() and 1 <= int(workers) <= 256):
        src = merged["server.workers"].source if "server.workers" in merged else DEFAULT_SOURCE
        errors.append(f"server.workers = {_show(cfg.server.workers)} ({src}): a number from 1 "
                      "to 256, or auto")
    elif cfg.server.threads != 1 and "server.workers" not in merged:
        # The seed's spelling: taken as server.workers, with a note.
        src = merged["server.threads"].source
        cfg = attrs.evolve(cfg, server=attrs.evolve(cfg.server, workers=str(cfg.server.threads)),
                           warnings=(*cfg.warnings, f"server.threads = {cfg.server.threads} "
                                     f"({src}): the seed's name for server.workers, taken as "
                                     "that"))
    if bool(cfg.ssl.cert_file) != bool(cfg.ssl.key_file):
        given = "ssl.cert_file" if cfg.ssl.cert_file else "ssl.key_file"
        missing = "ssl.key_file" if cfg.ssl.cert_file else "ssl.cert_file"
        errors.append(f"{given} = {_show(getattr(cfg.ssl, given.split('.')[1]))} "
                      f"({merged[given].source}): needs {missing} too")
    if cfg.server.max_buffered_body_bytes < cfg.server.max_body_bytes:
        key = "server.max_buffered_body_bytes"
        src = merged[key].source if key in merged else DEFAULT_SOURCE
        errors.append(f"{key} = {cfg.server.max_buffered_body_bytes} ({src}): less than "
                      f"server.max_body_bytes ({cfg.server.max_body_bytes}), so the largest "
                      "bodies would always be refused")
    errors.extend(_weight_problems("balancer.weights", cfg.balancer.weights, merged))
    for model, w in cfg.balancer.model_weights.items():
        errors.extend(_weight_problems(f"balancer.model_weights.{model}", w, merged))
    if "balancer.weights" in merged and not errors:
        # Given weights complete the defaults rather than replace them.
        cfg = attrs.evolve(cfg, balancer=attrs.evolve(
            cfg.balancer, weights={**DEFAULT_WEIGHTS, **cfg.balancer.weights}))
    if cfg.demo.enabled and 0 in cfg.demo.ports and cfg.server.workers.strip() != "1":
        errors.append(f"demo.ports = {_show(cfg.demo.ports)} "
                      f"({merged['demo.ports'].source if 'demo.ports' in merged else DEFAULT_SOURCE}"
                      "): with server.workers above 1 the demo's mocks need fixed ports, "
                      "which every worker sends to")
    header = cfg.tenants.header
    if header and not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", header):
        errors.append(f"tenants.header = {_show(header)} ({merged['tenants.header'].source}): "
                      "not an HTTP header name")
    elif header.lower() in CREDENTIAL_HEADERS:
        errors.append(f"tenants.header = {_show(header)} ({merged['tenants.header'].source}): "
                      "a credential, which would become a metrics label; the tenant is "
                      "derived from the credential when tenants.header is empty")
    elif header and not cfg.tenants.trusted_proxies:
        cfg = attrs.evolve(cfg, warnings=(*cfg.warnings, (
            f"tenants.header = {_show(header)} ({merged['tenants.header'].source}) with no "
            "tenants.trusted_proxies: the header is ignored from every client")))
    admin = cfg.admin
    if admin.http_port >= 0 and not admin.token:
        from ntonix.http.admin_auth import is_loopback
        if not is_loopback(admin.http_bind):
            src = merged["admin.http_bind"].source if "admin.http_bind" in merged \
                else DEFAULT_SOURCE
            errors.append(f"admin.http_bind = {_show(admin.http_bind)} ({src}): an admin "
                          "listener off loopback needs admin.token (it shows tenants, "
                          "backends and every figure; set NTONIX_ADMIN_TOKEN)")
    for entry in cfg.proxy.passthrough:
        why = entry_problem(entry)
        if why:
            errors.append(f"proxy.passthrough = {_show(entry)} "
                          f"({merged['proxy.passthrough'].source}): {why}")
    if cfg.tenants.trusted_proxies:
        from ntonix.identity import parse_networks
        try:
            parse_networks(cfg.tenants.trusted_proxies)
        except ValueError as e:
            errors.append(f"tenants.trusted_proxies = {_show(list(cfg.tenants.trusted_proxies))} "
                          f"({merged['tenants.trusted_proxies'].source}): {e}")
    for name, tenant in cfg.tenants.keys.items():
        if not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", name) or not isinstance(tenant, str) \
                or not tenant or len(tenant) > 64:
            # The entry is not shown: it may be a key in clear.
            errors.append(f"tenants.keys ({merged['tenants.keys'].source}): expected "
                          '"sha256:<64 hex digits of the key>": "<tenant name>" entries '
                          "(python3 -c 'import hashlib,sys; print(\"sha256:\" + "
                          "hashlib.sha256(sys.argv[1].encode()).hexdigest())' KEY)")
            break
    for i, b in enumerate(cfg.backends):
        for name in ("health_path", "metrics_path"):
            path = getattr(b, name)
            if path and (not path.startswith("/") or not path.isascii()
                         or any(c.isspace() for c in path)):
                errors.append(f"backends[{i}].{name} = {_show(path)} "
                              f"({merged['backends'].source}): a path starting with /")
    urls = [("cache.redis_url", cfg.cache.redis_url)]
    if cfg.cluster.redis_url != "off":  # off: no sharing through Redis
        urls.append(("cluster.redis_url", cfg.cluster.redis_url))
    for key, url in urls:
        if url:
            try:
                parse_redis_address(url)
            except ValueError as e:
                errors.append(f"{key} = {_show(url)} ({merged[key].source}): {e}")
    errors.extend(_redis_trust_problems(cfg, merged))
    if cfg.cache.redis_url and not cfg.cache.redis_secret:
        cfg = attrs.evolve(cfg, warnings=(*cfg.warnings, (
            "cache.redis_url is set and cache.redis_secret is not: entries and live answers "
            "in Redis are checked but not authenticated, so whoever can write to that Redis "
            "can choose what every gateway answers (set the same cache.redis_secret on every "
            "gateway)")))
    for tenant, cls in cfg.tenants.classes.items():
        src = merged["tenants.classes"].source
        if not isinstance(cls, dict) or set(cls) - {"priority", "weight"}:
            errors.append(f"tenants.classes.{tenant} = {_show(cls)} ({src}): expected "
                          '{"priority": "critical|standard|sheddable", "weight": N}')
        elif cls.get("priority", cfg.tenants.default_priority) not in PRIORITIES:
            errors.append(f"tenants.classes.{tenant}.priority = {_show(cls['priority'])} "
                          f"({src}): must be one of " + ", ".join(PRIORITIES))
        elif isinstance(cls.get("weight", 1), bool) \
                or not isinstance(cls.get("weight", 1), (int, float)) \
                or not 0 < cls.get("weight", 1) <= 1000:
            errors.append(f"tenants.classes.{tenant}.weight = {_show(cls['weight'])} "
                          f"({src}): expected a number above 0, at most 1000")
    for host, pair in cfg.ssl.sni.items():
        src = merged["ssl.sni"].source
        if not isinstance(pair, dict) or set(pair) != {"cert_file", "key_file"} \
                or not all(isinstance(v, str) and v for v in pair.values()):
            errors.append(f"ssl.sni.{host} = {_show(pair)} ({src}): expected "
                          '{"cert_file": "...", "key_file": "..."}')
    if errors:
        raise ConfigError(errors)
    return cfg


def load(
    cli: Mapping[str, Raw],
    environ: Mapping[str, str],
    config_path: Optional[str] = None,
) -> Config:
    """Assemble the configuration: defaults < file < environment < CLI.

    ``config_path`` is the ``--config`` value; without it ``NTONIX_CONFIG`` is
    used; without either, only defaults, environment and CLI apply. What was
    ignored with a warning is in the result's ``warnings``.
    """
    path = config_path or environ.get(ENV_CONFIG) or None
    layers: List[Mapping[str, Raw]] = []
    errors: List[str] = []
    warnings: List[str] = []
    if path:
        try:
            layers.append(read_file_layer(path))
        except ConfigError as e:
            errors.extend(e.lines)
    try:
        layers.append(read_env_layer(environ, warnings))
    except ConfigError as e:
        errors.extend(e.lines)
    if errors:
        raise ConfigError(errors)
    layers.append(cli)
    return build(layers, source_file=path, warnings=warnings)



def shown(cfg: Config) -> Dict[str, Any]:
    """The configuration as it may be shown (the console): settings marked
    ``secret`` hidden when set, credentials in URLs masked."""
    def show(_inst: Any, f: Optional[attrs.Attribute], value: Any) -> Any:
        if f is not None and f.metadata.get("secret") and value:
            return "(hidden)"
        if isinstance(value, str) and "://" in value:
            return mask_redis_url(value)
        return value

    doc = attrs.asdict(cfg, filter=lambda a, v: a.name not in ("sources",),
                       value_serializer=show)
    doc["sources"] = dict(cfg.sources)
    return doc


MIN_REDIS_SECRET = 16


def _redis_trust_problems(cfg: Config, merged: Mapping[str, Raw]) -> List[str]:
    """cache.redis_secret and cache.redis_ca_file; the secret is never shown."""
    out = []
    secret = cfg.cache.redis_secret
    if secret and len(secret) < MIN_REDIS_SECRET:
        out.append(f"cache.redis_secret ({merged['cache.redis_secret'].source}): "
                   f"{MIN_REDIS_SECRET} characters at least (python3 -c 'import secrets; "
                   "print(secrets.token_urlsafe(32))')")
    ca_file = cfg.cache.redis_ca_file
    if ca_file:
        src = merged["cache.redis_ca_file"].source
        try:
            with open(ca_file, "rb") as fh:
                pem = fh.read()
        except OSError as e:
            out.append(f"cache.redis_ca_file = {_show(ca_file)} ({src}): cannot be read: "
                       f"{e.strerror or e}")
        else:
            if b"-----BEGIN CERTIFICATE-----" not in pem:
                out.append(f"cache.redis_ca_file = {_show(ca_file)} ({src}): no PEM "
                           "certificate in it")
    return out


def cluster_redis_url(cfg: Config) -> str:
    """The Redis that gateways share scheduling state through ("" for none)."""
    url = cfg.cluster.redis_url
    if url == "off":
        return ""
    return url or cfg.cache.redis_url


def flag_settings() -> Dict[str, str]:
    """Command-line flag (without dashes) -> setting, for settings with a flag
    that takes a value (``--demo`` is a switch)."""
    return {f.metadata["cli"][2:]: key for key, f in all_settings()
            if f.metadata.get("cli") and f.type is not bool}


_TYPE_NAMES = {int: "integer", float: "number", bool: "boolean", str: "string"}


def reference_table() -> str:
    """The README's table of every setting (a test keeps them equal)."""
    rows = ["| setting | type | default | environment | command line | meaning |",
            "|---|---|---|---|---|---|"]
    for key, f in all_settings():
        choices = f.metadata.get("choices")
        kind = (" or ".join(f"`{c}`" for c in choices) if choices
                else _TYPE_NAMES.get(f.type, "list of ports" if f.type == List[int] else "object"))
        alias = [name for name, k in ENV_ALIASES.items() if k == key]
        env = f"`{env_name(key)}`" + "".join(f", `{a}`" for a in alias)
        cli = f"`{f.metadata['cli']}`" if f.metadata.get("cli") else f"`--set {key}=`"
        meaning = f.metadata["help"] + ("; restart to change" if f.metadata.get("restart") else "")
        rows.append(f"| `{key}` | {kind} | `{json.dumps(default_of(f))}` | {env} | {cli} | "
                    f"{meaning} |")
    return "\n".join(rows) + "\n"
