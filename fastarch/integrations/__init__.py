"""fastarch inside other libraries' models: ``fastarch.integrations.transformers`` (an
attention implementation named "fastarch") and ``fastarch.integrations.diffusers`` (an
attention processor). Each is imported on demand: the library it serves is optional."""
