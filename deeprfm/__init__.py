"""deeprfm: Recursive Feature Machines, Deep RFM and neural-collapse analysis.

The estimators follow scikit-learn's conventions and compute with torch on the CPU or a GPU.
"""

from deeprfm.agop import agop, kernel_agop, normalize_matrix, psd_power
from deeprfm.deep import DeepRFM
from deeprfm.hyperbf import HyperBFClassifier, HyperBFRegressor
from deeprfm.kernels import (
    GaussianKernel,
    GeneralizedLaplaceKernel,
    Kernel,
    LaplaceKernel,
    make_kernel,
)
from deeprfm.persist import ModelFileError
from deeprfm.rfm import RFMClassifier, RFMRegressor
from deeprfm.selection import AGOPFeatureSelector

__version__ = "0.1.0"

__all__ = [
    "AGOPFeatureSelector",
    "DeepRFM",
    "GaussianKernel",
    "GeneralizedLaplaceKernel",
    "HyperBFClassifier",
    "HyperBFRegressor",
    "Kernel",
    "LaplaceKernel",
    "ModelFileError",
    "RFMClassifier",
    "RFMRegressor",
    "agop",
    "kernel_agop",
    "make_kernel",
    "normalize_matrix",
    "psd_power",
]
