"""The routing policy: YAML written by SREs, parsed once into frozen dataclasses."""
