"""compact_vit: compact vision transformers in JAX/Flax."""
