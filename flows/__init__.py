"""The flows users run and deploy: the shared model session, batch inference."""
