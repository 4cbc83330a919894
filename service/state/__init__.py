"""What replicas share: idempotency claims and answers, grants, the links to Redis."""
