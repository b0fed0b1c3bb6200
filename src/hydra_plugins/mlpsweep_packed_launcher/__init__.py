"""mlpsweep's Hydra launcher `hydra/launcher=packed`: a sweep's runs trained together as stacked
networks (mlpsweep.packed), each logged as its own job."""
