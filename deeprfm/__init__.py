"""deeprfm: Recursive Feature Machines, Deep RFM and neural-collapse analysis."""

__version__ = "0.1.0"
