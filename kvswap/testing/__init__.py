"""Test support, shipped so that a new backend can be checked the way kvswap's own are.

* ``connector_suite`` and ``meta_suite``: the conformance suites (pytest classes: they need
  the ``test`` extra, ``pip install kvswap[test]``);
* ``servers``: real servers on loopback, started and stopped by PID (no pytest);
* ``engine_worker``, ``service``, ``vllm``, ``vllm_driver``: processes that tests and
  benchmarks drive (an engine instance, ``kvswap serve``, vLLM).

Nothing outside this package imports it: the library, the service and the demo run without it.
"""
