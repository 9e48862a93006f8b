"""The cpu backend of attention: what it supports, registered with attention_backends.add_backend."""
