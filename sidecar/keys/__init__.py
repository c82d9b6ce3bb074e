"""The key hierarchy: blobs (``envelope``) and the KEKs that seal them (``keyring``)."""
