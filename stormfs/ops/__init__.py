"""The pyfuse3 operations, split by kind; `stormfs.fs` assembles them."""
