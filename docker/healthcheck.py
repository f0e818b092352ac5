"""Container health probe: exit 0 when the server's GET /health answers 200, else 1.

Used by the Dockerfiles' HEALTHCHECK and the compose file, so both probe the same way. It reads the
same MEGALODON_HOST / MEGALODON_PORT as the server, needs only the standard library (the runtime
images have no curl), and sends no API key: /health is open by contract.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

# A server bound to every interface is reached over loopback from inside its own container.
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


def health_url() -> str:
    host = os.environ.get("MEGALODON_HOST", "0.0.0.0")
    if host in _WILDCARD_HOSTS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = os.environ.get("MEGALODON_PORT", "8000")
    return f"http://{host}:{port}/health"


def main() -> int:
    url = health_url()
    try:
        # Docker kills the probe at its own timeout; a shorter one here leaves room to print why.
        with urllib.request.urlopen(url, timeout=4) as response:
            status = response.status
    except urllib.error.HTTPError as exc:  # 503 while the model loads
        status = exc.code
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
