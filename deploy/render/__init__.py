"""Render the Grafana dashboards from real data without Grafana: the dashboards' PromQL, Prometheus, matplotlib."""
