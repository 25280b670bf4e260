"""Development tools shared by tests/, bench/, loadtests/ and scripts/: the server launcher
(`launcher`), the load client (`loadclient`), /proc readers (`procfs`) and the percentile
(`stats`). Not part of the served package: neither the wheel nor the image holds it."""
