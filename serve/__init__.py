"""Ray Serve deployment of the aligned model: HTTP API, LoRA adapter multiplexing, comparison page.

``serve.app`` builds the application; ``serve.schemas`` holds the API's models and bounds,
``serve.errors`` its error shape and body limit, ``serve.access`` the keys and who may use which
model, ``serve.model_index`` which adapter serves a model id, ``serve.adapter_files`` the replica's
cache of registry LoRA files, ``serve.model_cards`` what ``/v1/models`` says of a model, and
``serve.config_gen`` writes the ``serve deploy`` config (``serve/config.yaml``) from a project config.
"""
