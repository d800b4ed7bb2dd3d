"""FedInspect benchmarks (``python -m bench``, from a checkout): extraction speed
against the CPU's limit, bytes on the wire, server ingest under load, cycle time,
accuracy, and Flower's FedAvg on the same task. Every figure is the median of repeated
runs with min and max beside it; every comparison is a ratio of numbers measured in the
same run.

Not installed with the product and never imported by it: the benchmarks import
``fedinspect`` and its services, not the other way round."""
