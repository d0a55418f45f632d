# Node.js and panva's npm packages `dpop` and `jose` for the JavaScript DPoP
# interop test (tests/it/dpop_node.rs): Node and npm from Debian when
# missing, then the locked modules (tests/interop/node/package-lock.json)
# with `npm ci` when node_modules is not there yet.
need_apt node nodejs
need_apt npm npm
if [ ! -d tests/interop/node/node_modules ]; then
    (cd tests/interop/node && npm ci --no-audit --no-fund --loglevel=error)
fi
node --version
