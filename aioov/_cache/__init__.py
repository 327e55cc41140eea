"""The model cache: keys, on-disk store, locks, in-flight de-duplication, export."""
