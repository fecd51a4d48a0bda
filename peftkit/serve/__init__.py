"""Using a trained run: interactive chat (an HTTP endpoint comes later)."""
