"""Model families, found by `model_type` through `registry.family_for`."""
