"""mdlda: mid-level perceptual features of music, adapted to solo piano by unsupervised domain adaptation.

The package does nothing on import and never imports the Ray layer (:mod:`pipelines`); the command line is
:mod:`pipelines.cli`.
"""

__version__ = "0.1.0"
