# promtool for `promtool check metrics` on a real scrape (tests/it/prometheus.rs).
need_apt promtool prometheus
promtool --version 2>&1 | head -1
