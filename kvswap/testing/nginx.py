"""nginx in front of several ``kvswap serve`` (or vLLM) instances, for deployment tests and
benchmarks: round robin, a refused connection moves a request to the next instance."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from kvswap.testing.servers import find_binary, free_port, port_open, spawn, wait_until

NGINX_CONF = """worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
daemon off;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream kvswap {{
{servers}
  }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size {max_body};
    location / {{
      proxy_pass http://kvswap;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_connect_timeout 2s;
      proxy_read_timeout 120s;
      proxy_next_upstream error timeout;
    }}
  }}
}}
"""


def nginx(workdir: Path, upstreams: list[str], port: int | None = None,
          max_body: str = "16m") -> tuple[subprocess.Popen, int]:
    """Debian's nginx in the foreground, round robin over ``upstreams`` (``host:port``); a
    connection refused moves a request to the next upstream (nginx does not resend a POST
    that reached a server). Returns (process, port); stop it with :func:`stop_pid`."""
    binary = find_binary("nginx") or "/usr/sbin/nginx"
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    for temp in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / temp).mkdir(exist_ok=True)
        os.chmod(workdir / temp, 0o777)  # nginx workers run as nobody when started by root
    servers = "\n".join(f"    server {u} max_fails=1 fail_timeout=2s;" for u in upstreams)
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, servers=servers, port=port, max_body=max_body))
    proc = spawn([binary, "-c", str(conf), "-p", str(workdir)], workdir / "nginx.log")
    wait_until(lambda: port_open(port), 10, "nginx", proc)
    return proc, port
