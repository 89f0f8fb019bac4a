"""grantkey: a data API server where API keys are PostgreSQL roles."""

__version__ = "0.1.0"
