"""medfusion: train and serve a multimodal (image + clinical note) medical model on Ray.

Nothing happens at import time: subpackages import their heavy frameworks lazily.
"""

__version__ = "0.1.0"
