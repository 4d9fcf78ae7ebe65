"""AnomalyFlagLib: slice-level anomaly detection for CT/MRI (GAN detectors), independent of Slicer.

Importing this package never imports slicer, vtk or qt; heavy modules (torch, MONAI) are imported by the
submodules that need them.
"""

__version__ = "0.1.0"
