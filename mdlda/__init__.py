"""mdlda: mid-level perceptual features of music, adapted to solo piano by unsupervised domain adaptation.

The package does nothing on import; see ``mdlda.cli`` for the command line.
"""

__version__ = "0.1.0"
