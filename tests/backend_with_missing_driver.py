"""A backend module whose driver is not installed (for the registry's install hint)."""

import kvswap_test_driver_that_is_not_installed  # noqa: F401


class Thing:
    pass
