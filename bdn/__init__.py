"""bdn: weight delivery and cold start for GPU inference clusters.

This package holds what every service shares: the ``weights:`` config, sources, the
blob store, the mirror, and the ``bdn`` command line.
"""

__version__ = "0.1.0"
