"""Real servers the tests start: redis-server, the gateway, the simulated backend, an OTLP receiver."""
