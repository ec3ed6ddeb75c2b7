"""The selector benchmark: grids of fine-tuning runs, each selector against random selection paired by seed.

grids (what is run: GridSpec, presets, run configurations and ids) < runner (executes and records runs,
git-commits them: git_tools) < summary (the analysis, with safekeel.eval.stats) < report, plots (the
outputs) < cli (`safekeel bench` and the benchmarks/ scripts). confirm is the pre-registered confirmatory
test, rerun regenerates the replies of committed runs. Run records, replies and outputs go where the caller
says; only cli defaults to the checkout's benchmarks/ folders.
"""
