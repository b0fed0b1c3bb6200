"""Train one model, or sweep many with -m: `python train.py -m activation=sigmoid,tanh,relu norm=none,batchnorm`."""

if __name__ == "__main__":
    # imported here, not at the top: a figure worker process (spawned) imports this file as its
    # main module, and needs none of what training imports (torch, MLflow, Hydra)
    from mlpsweep.cli import main

    main()
