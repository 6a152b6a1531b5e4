"""stormfs: a transparent encrypting FUSE filesystem, byte-compatible with
Storm Cloud's server-side encryption (AES-256-GCM v1 envelopes, mixed mode)."""

__version__ = "0.1.0"
