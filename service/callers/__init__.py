"""What other teams run: the bulk tool (the client library is the sign_in_tokens_client distribution)."""
