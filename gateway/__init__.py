"""An OpenTelemetry-native inference gateway for OpenAI-compatible model APIs."""

__version__ = "0.1.0"
