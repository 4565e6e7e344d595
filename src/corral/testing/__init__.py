"""Fakes for testing the layers above compute without root or namespaces."""
