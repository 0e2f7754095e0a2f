"""One router per resource of the service: ``ops`` (health, metrics), ``generate`` (API token),
``sessions`` (admin token) and ``seed`` (admin token). :func:`kvswap.service.app.create_app`
mounts them with shared auth dependencies and one error handler."""
