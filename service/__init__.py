"""sign-in-token-service: Clerk sign-in tokens behind a RabbitMQ queue."""

__version__ = "0.1.0"
