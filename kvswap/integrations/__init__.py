"""Where real engines plug into kvswap: :mod:`kvswap.integrations.vllm` (a KV connector and a
model loader). Each subpackage imports its engine; the rest of kvswap never does."""
