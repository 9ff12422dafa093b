"""The on-disk volume: codec, atomic writes, packs of blocks, snapshots, state and the lock.
This layer knows nothing of mirrors."""
