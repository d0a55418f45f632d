# Helpers for .ci/deps/*.sh (sourced by .ci/run).
# need_apt CMD PKG...: installs Debian packages unless CMD is on PATH.
need_apt() {
    local cmd=$1
    shift
    if command -v "$cmd" >/dev/null 2>&1; then
        return 0
    fi
    if [ -z "${APT_UPDATED:-}" ]; then
        apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    command -v "$cmd" >/dev/null 2>&1 || { echo "installing $* did not give $cmd" >&2; return 1; }
}
# need_pip PKG...: installs PyPI packages into the tests' venv.
need_pip() {
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "$@"
}
