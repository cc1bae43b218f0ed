"""Storage tiers: one key -> encoded page store per backend, all behind `base.Tier`.

Owns: the Tier contract (base.py), the CPU tier and its page slots (cpu.py, slots.py, lru.py), the
disk tier (disk.py), the Redis tier (redis.py) and the remote tier (remote.py: another store,
through a client it is handed).

May import: the bottom of cachestore only (keys, codec, errors, page_mac, config, and
shm.segments, the /dev/shm file primitive that the CPU tier's shared arenas are made of). Never
store, the rest of shm, or rpc: a tier knows nothing of chains, namespaces or the wire.
"""
