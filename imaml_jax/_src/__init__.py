"""Private implementation modules; import the public names from ``imaml_jax``."""
