"""FedInspect benchmarks (``fedinspect bench``): extraction speed against the CPU's
limit, bytes on the wire, server ingest under load, cycle time, accuracy, and Flower's
FedAvg on the same task. Every figure is the median of repeated runs with min and max
beside it; every comparison is a ratio of numbers measured in the same run."""
