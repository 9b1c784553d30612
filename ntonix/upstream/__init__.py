"""The backend-facing side: pooled HTTP client, header rewriting, the relay."""
