"""circuitlab.reports: the application. The `circuitlab` command line, run configs, the run pipeline of typed
stages (`run`, `pipeline`, `faithful`, `summaries`, `result`), run folders, sweeps, studies and rendering."""
