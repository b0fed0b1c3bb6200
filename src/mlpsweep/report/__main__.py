from mlpsweep.report.cli import main

main()
