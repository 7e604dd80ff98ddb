"""Dedup: the request key (pure), the exact result cache with single-flight, the semantic cache."""
