"""Compare the runs of a sweep from the MLflow store: `python report.py [--sweep NAME] [--out DIR]`."""

from mlpsweep.report import main

if __name__ == "__main__":
    main()
