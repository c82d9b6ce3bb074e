"""Root-key backends: where root keys live and KEKs are made and unwrapped."""
