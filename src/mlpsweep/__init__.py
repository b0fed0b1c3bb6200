"""mlpsweep: regularization ablations of MLPs, composed with Hydra and tracked in MLflow."""
