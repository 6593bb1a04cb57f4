"""``python -m services.instance``: one customer's instance, as the local backend starts it.

The same as ``iotistic run --target instance``, without loading the rest of the command.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``--host``/``--port``, set up logging as ``iotistic run`` does, and serve."""
    parser = argparse.ArgumentParser(prog="python -m services.instance", description=__doc__)
    parser.add_argument("--host", help="HTTP address (default: HTTP_HOST)")
    parser.add_argument("--port", type=int, help="HTTP port (default: HTTP_PORT)")
    args = parser.parse_args(argv)
    from libs.config import ConfigError
    from libs.observability.logs import configure_logging
    from services.instance.server import serve_instance

    configure_logging(os.environ.get("LOG_LEVEL", "INFO"))
    try:
        return serve_instance(args.host, args.port)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
