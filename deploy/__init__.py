"""Deployment files, and tools that work on them (deploy.render: the dashboards drawn from real data)."""
