"""Research experiments run from a checkout (``python -m experiments.<name>``), as
torchvision keeps ``references/`` and Flower ``examples/`` and ``baselines/``.

Neither installed with the product nor imported by it: experiments import ``fedinspect``
and its services, never the other way round.
"""
