"""The response cache: keys, the byte-bounded LRU store, coalescing and replay."""
