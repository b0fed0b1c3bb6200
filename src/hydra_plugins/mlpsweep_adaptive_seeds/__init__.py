"""mlpsweep's Hydra sweeper `hydra/sweeper=adaptive_seeds` (its rounds: mlpsweep.adaptive)."""
