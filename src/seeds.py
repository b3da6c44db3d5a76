"""Random streams derived from the user's seed: any 64-bit integer, reduced deterministically.

A seed is one Cog input, but a run draws several independent streams from it (LoRA
initialisation, the data order of each epoch, each rank's dropout, sampling). Arithmetic on
the seed (`seed * 1_000_003 + epoch`) overflows what torch's generators accept for large seeds;
hashing the seed with the stream's name gives every stream its own 63-bit seed instead.
"""

import hashlib

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # the signed 64-bit range, the inputs' bounds


def derive_seed(seed: int, *stream: int | str) -> int:
    """A seed in [0, 2**63) for the named stream, the same for the same arguments."""
    digest = hashlib.sha256(repr((seed, *stream)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
