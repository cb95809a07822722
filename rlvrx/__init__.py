"""rlvrx: the linear dynamics of RLVR training, made usable."""

__version__ = "0.1.0"
