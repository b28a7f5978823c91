"""The `llmflow` command: the application entry above the flows it runs."""
