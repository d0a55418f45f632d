# etcd for the directory and shared replay store tests (Debian etcd-server).
need_apt etcd etcd-server
etcd --version | head -1
