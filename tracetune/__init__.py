"""tracetune: from an agent's production logs to a better, registered agent model."""

__version__ = "0.1.0"
