"""Long-context quality evaluations: perplexity against length, passkey retrieval."""
