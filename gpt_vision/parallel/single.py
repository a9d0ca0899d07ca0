"""One process on the CPU or one GPU: the reference every distributed strategy must match."""
from gpt_vision.parallel.full_replica import FullReplicaStrategy


class SingleStrategy(FullReplicaStrategy):
    """The model as it is, on one device: nothing wrapped, nothing reduced."""
