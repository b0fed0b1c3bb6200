"""Train one model, or sweep many with -m: `python train.py -m activation=sigmoid,tanh,relu norm=none,batchnorm`."""

from mlpsweep.cli import main

if __name__ == "__main__":
    main()
