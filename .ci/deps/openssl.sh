# openssl CLI: the certs tests make an external CA, an intermediate and
# leaves with it, as cert-manager or a bank's own PKI would hand them over.
need_apt openssl openssl
openssl version
