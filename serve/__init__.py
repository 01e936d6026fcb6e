"""Ray Serve deployment of the aligned model: HTTP API, LoRA adapter multiplexing, comparison page.

``serve.app`` builds the application, ``serve.schemas`` holds the API's models and bounds,
``serve.adapters`` finds the LoRA behind each model id, ``serve.config_gen`` writes the
``serve deploy`` config (``serve/config.yaml``) from a project config.
"""
