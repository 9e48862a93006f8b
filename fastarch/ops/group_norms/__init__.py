"""The group_norms family: group_norm (with scale/shift and SiLU fused)."""
