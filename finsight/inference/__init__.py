"""The model that generates, generating with it, and its on-disk cache; no Lightning."""
