"""What every part uses: typed params (config), errors, atomic files (fs), git, processes and waits (procs),
locks, object storage, provenance, confidence intervals (stats), and the registry of peft methods."""
