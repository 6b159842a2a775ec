"""Looking inside a model: semi-NMF features of MLP activations.

Imports model, calibration, core."""
